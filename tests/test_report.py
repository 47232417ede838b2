import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modules.run.report import plot_losses, save_grid, write_report


def test_plot_losses_writes_png_and_survives_odd_series(tmp_path):
    history = {
        "loss_d": [(t * 10.0, math.sin(t / 5) + 1) for t in range(300)] + [(3000.0, float("nan")), (3010.0, 1e9)],
        "loss_g": [(0.0, 2.0), (5.0, float("inf")), (10.0, 1.5), (20.0, 1.4)],
        "lone": [(7.0, 3.0)],
        "empty": [],
        "junk": [(1.0, None), ("x", 2.0)],
    }
    path = plot_losses(history, tmp_path / "sub" / "losses.png")
    with Image.open(path) as img:
        assert img.size == (800, 400) and img.mode == "RGB"
        assert len(img.getcolors(1 << 16)) > 3  # something besides the background was drawn


def test_plot_losses_without_data(tmp_path):
    for i, history in enumerate([{}, {"loss_d": []}, {"loss_d": [(0.0, float("nan"))]}, {"c": [(5.0, 1.0)] * 3}]):
        with Image.open(plot_losses(history, tmp_path / f"p{i}.png")) as img:
            assert img.size == (800, 400)


def test_save_grid_layout(tmp_path):
    imgs = np.stack([np.full((4, 5, 3), v, np.uint8) for v in (10, 20, 30)])
    with Image.open(save_grid(imgs, tmp_path / "g.png", nrow=2, pad=1)) as img:
        grid = np.asarray(img)
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    assert (grid[1:5, 1:6] == 10).all() and (grid[1:5, 7:12] == 20).all() and (grid[6:10, 1:6] == 30).all()
    assert (grid[0] == 255).all() and (grid[6:10, 7:12] == 255).all()  # gaps and the missing fourth cell


def test_save_grid(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    with Image.open(save_grid(imgs, tmp_path / "g.png", nrow=4)) as img:
        assert img.size == (4 * 10 + 2, 3 * 10 + 2)


def test_write_report_converts_odd_values(tmp_path):
    report = {
        "fid": np.float32(12.5), "n": np.int64(3), "flag": np.bool_(True), "arr": np.arange(3),
        "nan": float("nan"), "inf": np.float64("inf"), "path": Path("/x/y"), "tensor": torch.tensor([1.5, 2.0]),
        "nested": {1: (1, 2), "s": {3}}, "obj": object(),
    }
    path = write_report(tmp_path / "r" / "report.json", report)
    data = json.loads(path.read_text())
    assert data["fid"] == 12.5 and data["n"] == 3 and data["flag"] is True and data["arr"] == [0, 1, 2]
    assert data["nan"] is None and data["inf"] is None and data["path"] == "/x/y" and data["tensor"] == [1.5, 2.0]
    assert data["nested"] == {"1": [1, 2], "s": [3]} and data["obj"].startswith("<object")
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    write_report(path, {"again": 1})
    assert json.loads(path.read_text()) == {"again": 1}
