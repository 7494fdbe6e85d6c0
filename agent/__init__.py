"""V + M + C acting: loading the trained world, the policy, real and dreamed episodes,
track-seed ranges, scoring a CMA-ES population through a pool, the display window."""
