"""sd_core: the Stable Diffusion engine on diffusers/torch. Plain Python; never imports Django."""
