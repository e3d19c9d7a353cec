"""One trainer per run: an exclusive flock on `<checkpoint dir>/.lock`, held by rank 0.

flock belongs to the open file, so the kernel drops it when the holder dies however it dies
(SIGKILL, OOM killer): no stale lock to clean up by hand. The holder writes its host, pid and
start time into the file after taking the lock, for the refusal message of a second trainer.
The file itself is never deleted (deleting a lock file races with a newcomer opening it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time

from megalm.errors import UserError

UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunLock:
    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise UserError naming the holder (host, pid)."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that has not yet written its name"
            os.close(fd)
            raise UserError(f"{os.path.dirname(self.path)}: another trainer is running this run (held by {holder}); "
                            f"stop it first, or use another run name / checkpoint.dir") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in UNSUPPORTED:
                raise
            # Lustre mounted without `flock`, some FUSE filesystems: train anyway, unguarded.
            print(f"warning: {self.path}: this filesystem cannot lock files ({exc.strerror}); a second trainer "
                  f"of this run would not be stopped", file=sys.stderr, flush=True)
            return
        except BaseException:
            os.close(fd)
            raise
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {stamp}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock

    def __del__(self) -> None:
        self.release()
