"""`megalm prep`: raw corpora -> tokenized Arrow shards + manifest.json (docs/interfaces.md).

readers (inputs -> documents), builtin (the embedded corpus), tokenizer (train/load/encode),
units (work units -> shards), shards (Arrow + atomic io), manifest, outdir (resume/refuse),
mpi (rank split), pipeline (orchestration), cli (argument parsing).
"""
