"""The labelled sample sheets: breeds.png (one row per breed, the same latents in every row, the breed's name at the
row's start) and interpolation.png (latent interpolation within a breed; breed to breed through the shared class
embedding where G has one), as BigGAN-PyTorch's sample sheets."""
import contextlib
import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from modules.recipe.sample import sampling_mode, to_uint8, truncated_z
from modules.run.report import image_grid

SHEET_PER_BREED = 6  # samples per breed in breeds.png
INTERP_STEPS = 8  # images per interpolation row, both ends included
INTERP_ROWS = 3  # rows of each kind in interpolation.png
SHEET_PAD = 2  # pixels around and between images (image_grid's)


def breed_label(name):
    """An annotation folder's name -> the breed as people write it: "n02106662-German_shepherd" -> "German shepherd"."""
    return re.sub(r"^n\d+-", "", name).replace("_", " ")


def shared_embedding(G):
    """G's class embedding shared by its blocks (the BigGAN G's `shared`) when it has more than one breed, else None."""
    shared = getattr(G, "shared", None)
    return shared if isinstance(shared, nn.Embedding) and shared.num_embeddings > 1 else None


def conditioned_on_breed(G):
    """Does G's output depend on the breed? (an unconditional G has no embedding of more than one class)"""
    return any(isinstance(m, nn.Embedding) and m.num_embeddings > 1 for m in G.modules())


@contextlib.contextmanager
def _embedding_replaced(G, vectors):
    """G.shared(y) answers `vectors` [N,shared_dim] instead (a forward hook), so that a forward pass can take class
    embeddings between two breeds; vectors None: unchanged."""
    if vectors is None:
        yield
        return
    handle = shared_embedding(G).register_forward_hook(lambda module, inputs, output: vectors.to(output.dtype))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def sample_rows(sampler, z, y, *, shared=None):
    """uint8 [N,H,W,3] from the sampler's generator (its sampling mode, precision and device) at latents z [N,z_dim]
    and breeds y [N] long, in batches of sampler.batch. shared: [N,shared_dim] class embeddings to use instead of
    G.shared(y)."""
    G, device, out = sampler.model(), sampler.device, []
    with sampling_mode(G, sampler.sample_bn):
        for i in range(0, len(z), sampler.batch):
            part = slice(i, i + sampler.batch)
            with _embedding_replaced(G, None if shared is None else shared[part].to(device)), torch.autocast(
                    device.type, dtype=sampler.amp_dtype, enabled=sampler.amp_dtype is not None):
                out.append(to_uint8(G(z[part].to(device), y[part].to(device))))
    return np.concatenate(out)


def labelled_rows(images, labels, *, per_row):
    """uint8 [rows*per_row,H,W,3] -> PIL image: image_grid's rows, each row's label in black on white at its start
    (PIL's default font)."""
    grid = image_grid(images, nrow=per_row, pad=SHEET_PAD)
    font = ImageFont.load_default()
    margin = int(max(ImageDraw.Draw(grid).textlength(text, font=font) for text in labels)) + 4 * SHEET_PAD
    sheet = Image.new("RGB", (grid.width + margin, grid.height), "white")
    sheet.paste(grid, (margin, 0))
    draw, h = ImageDraw.Draw(sheet), images.shape[1]
    for row, text in enumerate(labels):
        draw.text((2 * SHEET_PAD, SHEET_PAD + row * (h + SHEET_PAD) + h // 2 - 6), text, fill="black", font=font)
    return sheet


def breeds_sheet(sampler, classes, *, seed, per_breed=SHEET_PER_BREED):
    """breeds.png: one row per breed (all of them), the same per_breed latents (seeded) in every row."""
    z = truncated_z(per_breed, sampler.z_dim, sampler.truncation, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(len(classes)).repeat_interleave(per_breed)
    return labelled_rows(sample_rows(sampler, z.repeat(len(classes), 1), y), [breed_label(c) for c in classes],
                         per_row=per_breed)


def interpolation_sheet(sampler, classes, *, seed):
    """interpolation.png: INTERP_ROWS rows from one latent to another within a breed; then, where G has a shared class
    embedding, INTERP_ROWS rows from one breed to another at a fixed latent, through that embedding. Linear steps:
    a point between two truncated latents is within the truncation too."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, INTERP_STEPS)[:, None]  # [S,1]
    pairs = torch.randint(len(classes), (INTERP_ROWS, 2), generator=gen).tolist()  # (breed, second breed) per row
    ends = truncated_z(2 * INTERP_ROWS, sampler.z_dim, sampler.truncation, generator=gen)
    z = torch.cat([(1 - t) * ends[2 * r] + t * ends[2 * r + 1] for r in range(INTERP_ROWS)])  # [ROWS*S, z_dim]
    y = torch.as_tensor([a for a, _ in pairs]).repeat_interleave(INTERP_STEPS)
    images, labels = [sample_rows(sampler, z, y)], [breed_label(classes[a]) for a, _ in pairs]
    embedding = shared_embedding(sampler.model())
    if embedding is not None:
        emb = embedding.weight.detach().float().cpu()
        shared = torch.cat([(1 - t) * emb[a] + t * emb[b] for a, b in pairs])  # [ROWS*S, shared_dim]
        images.append(sample_rows(sampler, ends[:INTERP_ROWS].repeat_interleave(INTERP_STEPS, 0), y, shared=shared))
        labels += [f"{breed_label(classes[a])} > {breed_label(classes[b])}" for a, b in pairs]
    return labelled_rows(np.concatenate(images), labels, per_row=INTERP_STEPS)
