"""diffeditor-train: ``diffeditor train image-encoder | image-prompt | ldm``.

* :mod:`diffeditor_train.loop` is the shared plain-torch loop: checkpoints, bit-exact resume,
  a progress bar with the loss, bf16 autocast on GPUs.
* :mod:`diffeditor_train.data` gives (image, caption) datasets: the ``shapes`` generator or a
  folder of images with a ``captions.jsonl``.
* :mod:`diffeditor_train.image_encoder` trains a small ``CLIPVisionModelWithProjection`` against a
  model's frozen text encoder (locked-text contrastive tuning).
* :mod:`diffeditor_train.image_prompt` trains DiffEditor's image prompt (IP-Adapter-Plus resampler
  + ``to_k_ip``/``to_v_ip``) against a frozen UNet and writes the ``ip_sd15_64.bin`` layout.
* :mod:`diffeditor_train.ldm` is the recipe of the bundled ``shapes-ldm`` (VAE, then text
  encoder + UNet from scratch).
"""

__version__ = "0.1.0"
