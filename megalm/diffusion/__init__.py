"""Diffusion on the megalm engine: noise schedules, objectives (DDPM ε/v, flow matching),
samplers (DDPM, DDIM, Euler, Heun) with classifier-free guidance, sharded EMA, the training Task,
image shards, `megalm sample` for DiT checkpoints and PNG grids."""
