"""Headless training: ``python -m trainer train`` (and ``accelerate launch -m trainer train``).

Loads an SDXL single-file checkpoint (A1111 / ComfyUI layout) with configs and a tokenizer shipped here,
caches latents and text embeddings, and trains one WaveFT adapter per subject with :func:`trainer.train_waveft`,
on one process or data-parallel on many (Hugging Face ``accelerate``). Needs ``diffusers`` and ``transformers``
(and ``accelerate`` for several processes); the hosts never import this package.

Modules: ``cli`` (arguments), ``config`` (the run and its subjects, ``--config RUN.toml``), ``single_file``
(the checkpoint loader), ``tokenizer`` (CLIP BPE), ``cache`` (latents and embeddings), ``distributed``
(accelerate), ``run`` (orchestration).
"""
