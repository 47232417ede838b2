"""Sampling: truncated latents, breed labels from the training distribution, generation to uint8 images."""
import numpy as np
import torch

from modules.utils import eval_mode


def truncated_z(n, dim, threshold, *, generator=None, device="cpu"):
    """[n, dim] standard normal; with threshold > 0 every entry with |z| > threshold is resampled until none is left.

    Resampling (not clamping) keeps the distribution a truncated N(0,1): the BigGAN "truncation trick".
    """
    z = torch.randn(n, dim, generator=generator, device=device)
    if threshold and threshold > 0:
        if threshold < 0.05:
            raise ValueError(f"truncation threshold {threshold} is too small to sample from")
        bad = z.abs() > threshold
        while bool(bad.any()):
            z[bad] = torch.randn(int(bad.sum()), generator=generator, device=device)
            bad = z.abs() > threshold
    return z


def sample_labels(n, label_counts, *, generator=None, device="cpu"):
    """[n] long breed indices drawn with the training set's class frequencies (label_counts: [n_classes])."""
    probs = torch.as_tensor(label_counts, dtype=torch.float32)
    return torch.multinomial(probs, n, replacement=True, generator=generator).to(device)


def to_uint8(images):
    """[N,3,H,W] float in [-1,1] -> numpy uint8 [N,H,W,3]."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


@torch.no_grad()
def generate_images(G, *, n, z_dim, label_counts, truncation, batch_size, device, seed=0, amp_dtype=None):
    """Generate n images with G in eval mode -> uint8 [n,64,64,3]. Seeded: the same seed gives the same images."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with eval_mode(G):
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            z = truncated_z(m, z_dim, truncation, generator=gen).to(device)
            y = sample_labels(m, label_counts, generator=gen).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                x = G(z, y)
            out.append(to_uint8(x))
    images = np.concatenate(out)
    assert images.shape == (n, images.shape[1], images.shape[2], 3) and images.dtype == np.uint8
    return images
