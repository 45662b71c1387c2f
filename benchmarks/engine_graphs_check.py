"""The engine with compile=True (CUDA graphs on one GPU) against eager: speed, and the same losses.

python benchmarks/engine_graphs_check.py cuda 400
"""

import sys
import time

import torch

from diffusion_lib import AttentionUNet, NoiseSchedule, load_images, train

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 400
images, _ = load_images("mnist", limit=20000)
sched = NoiseSchedule.from_name("linear")
runs = {}
for compiled in (False, True):
    torch.manual_seed(0)
    t0 = time.perf_counter()
    r = train(
        AttentionUNet(),
        sched,
        images,
        steps=steps,
        batch_size=128,
        lr=2e-4,
        device=dev,
        compile=compiled,
        seed=0,
        progress=False,
    )
    wall = time.perf_counter() - t0
    loss = r.history.loss
    runs[compiled] = loss
    print(
        f"compile={compiled}: wall {wall:.1f} s, {r.history.images_per_second:,.0f} images/s "
        f"(after the first step), first losses {[round(v, 4) for v in loss[:3]]}, "
        f"mean of last 100 {sum(loss[-100:]) / 100:.4f}",
        flush=True,
    )
    with torch.no_grad():
        ema = r.ema_model.eval()
        x = torch.randn(4, 1, 28, 28, device=dev)
        print(
            "  EMA output finite:",
            bool(torch.isfinite(ema(x, torch.full((4,), 500, device=dev))).all()),
        )
d = [abs(a - b) for a, b in zip(runs[False], runs[True], strict=True)]
print(f"largest |loss difference| over {len(d)} steps: {max(d):.4f}; mean {sum(d) / len(d):.4f}")
