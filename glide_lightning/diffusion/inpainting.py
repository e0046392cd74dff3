"""Keeping known pixels while sampling an inpainting edit (GLIDE §4 "image inpainting"; glide-text2im's
inpainting notebook): the one place this lives.

At every step the sampler's prediction of the clean image, ``pred_xstart``, has its known region replaced
by the original image before the posterior q(x_{t-1} | x_t, pred_xstart) is formed: glide-text2im's
``denoised_fn`` for its inpainting models. At the last step (t = 0) the posterior mean is
``pred_xstart`` itself and no noise is added, so an ancestral (or DDIM) sample equals the original on
the known region exactly; applying the same function to the finished sample makes that hold for any
sampler. The network itself also sees the known pixels and the mask (``inpaint_image``, ``inpaint_mask``).
"""

from __future__ import annotations

from torch import Tensor

from glide_lightning.diffusion.gaussian import DenoisedFn

__all__ = ["keep_known"]


def keep_known(image: Tensor, keep: Tensor) -> DenoisedFn:
    """``x -> x·(1 − keep) + image·keep``: the known pixels of ``image`` ``[B, C, H, W]`` (``keep``
    ``[B, 1, H, W]``, 1 = known) pasted into an image prediction of the same shape."""

    def paste(x: Tensor) -> Tensor:
        return x * (1 - keep).to(x.dtype) + image.to(x.dtype) * keep.to(x.dtype)

    return paste
