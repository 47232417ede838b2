"""The training crops on the device: loaded there once as uint8, each batch indexed, flipped, noised and normalised
there (no host-to-device copy per step, no DataLoader)."""
import torch


class DeviceBatches:
    def __init__(self, images, labels, *, device, hflip, real_noise):
        # images: numpy uint8 [N,H,W,3] -> device uint8 [N,3,H,W]; labels: [N] long
        self.images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels).long().to(device)
        self.n = self.images.shape[0]
        self.hflip, self.real_noise = hflip, real_noise
        self.device = device

    def sample(self, batch_size):
        """-> x [B,3,H,W] float32 in about [-1,1] (+ U(0, real_noise)), y [B] long."""
        idx = torch.randint(self.n, (batch_size,), device=self.device)
        x = self.images[idx].float().mul_(2 / 255).sub_(1)
        if self.hflip:
            flip = torch.rand(batch_size, 1, 1, 1, device=self.device) < 0.5
            x = torch.where(flip, x.flip(3), x)
        if self.real_noise:
            x.add_(torch.rand_like(x), alpha=self.real_noise)
        return x, self.labels[idx]

    def fake_labels(self, batch_size):
        """Breeds for G drawn with the training distribution (the label of a random training row)."""
        return self.labels[torch.randint(self.n, (batch_size,), device=self.device)]
