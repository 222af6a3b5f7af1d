"""ViT accuracy against compression on Fashion-MNIST (197 tokens), and real foolbox images.

Command:  .venv/bin/python experiments/table_vit.py          --limit 500   (about 3 minutes)
          (the grid took 147 s: `seconds` in results/table_vit.json)
Smoke:    .venv/bin/python experiments/table_vit.py --smoke  (seconds; run by the tests)

The ViT task model (experiments/models/vit-fashion-mnist, `train_vit.py`) at N in {2, 4, 8},
CR from 1 up to the local length, both logit biases, training-free. Then the real CIFAR-10,
CIFAR-100, ImageNet and Fashion-MNIST sample images shipped with `foolbox` through the ViT path
end to end (PNG -> image processor -> prism on 4 devices): a smoke of real pixels, not a
metric. Writes experiments/results/table_vit.{json,md,png}.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import common

MODEL = common.HERE / "models" / "vit-fashion-mnist"


def foolbox_images() -> dict[str, list[tuple[Path, int]]]:
    """The sample PNGs shipped in foolbox/data, by set: (path, label from the file name)."""
    spec = importlib.util.find_spec("foolbox")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    sets: dict[str, list] = {}
    for path in sorted([*folder.glob("*.png"), *folder.glob("*.jpg")]):
        name, _, label = path.stem.split("_")
        sets.setdefault(name, []).append((path, int(label)))
    return sets


def real_pixels(model, devices: int = 4, cr: int = 4, sets=None) -> list[dict]:
    """Each foolbox set through the image processor and prism: CR = 1 against the exact model
    (must agree), CR = `cr` (how many predictions stay), accuracy where labels mean ours."""
    import numpy as np

    import prism_jax as pj

    rows, mesh = [], pj.edge_mesh(devices)
    for name, items in foolbox_images().items():
        if sets and name not in sets:
            continue
        batch = model.image_processor([p for p, _ in items])
        exact = pj.infer(model, batch)["logits"]
        cr1 = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=1))["logits"]
        crn = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=cr))["logits"]
        labels = np.array([label for _, label in items])
        rows.append(
            {
                "set": name,
                "images": len(items),
                "size": list(batch["pixel_values"].shape[1:]),
                "cr1_max_abs_diff": float(np.abs(cr1 - exact).max()),
                f"cr{cr}_same_prediction": float((crn.argmax(-1) == exact.argmax(-1)).mean()),
                "accuracy": float((exact.argmax(-1) == labels).mean())
                if name == "fashionMNIST"
                else None,
            }
        )
    return rows


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "a few images, N = 2, seconds")
    model: str = common.setting(str(MODEL), "a ViT classifier directory")
    limit: int = common.setting(1000, "test images (default 1000)")
    out: str | None = common.output(None, "results folder")


def main(argv=None):
    args = common.parse(Config, __doc__, argv)

    import prism_jax as pj
    from prism_jax.evaluation import report, tasks

    model = pj.load_pretrained(args.model)
    limit, devices = (8, (8,)) if args.smoke else (args.limit, (2, 4, 8))
    task = tasks.load(model, "fashion_mnist_local", limit=limit)
    title = "ViT (patch 2, 197 tokens) Fashion-MNIST"
    most = 3 if args.smoke else None  # a smoke: CR = 1, 2 and L
    result = report.grid(model, task, devices=devices, biases=report.BIASES, most_crs=most)
    pixels = real_pixels(model)
    if not args.smoke:  # ImageNet at 224 px, RGB, through a ViT-B/16-shaped model (random weights)
        import dataclasses

        from prism_jax import models
        from prism_jax.checkpoints.preprocess import ImageProcessor
        from prism_jax.configs import PRESETS

        cfg = PRESETS["vit-base-patch16-224"]()
        base = models.init(dataclasses.replace(cfg, head="classifier", num_labels=1000))
        base = models.Model(
            base.config, base.graphdef, base.params, None, ImageProcessor((224, 224))
        )
        for r in real_pixels(base, sets={"imagenet"}):
            pixels.append({**r, "set": "imagenet (ViT-B/16 shape, random weights)"})
    text = report.markdown(result, title) + "\n### Real foolbox images through the ViT path\n\n"
    text += "| set | images | pixel_values | CR=1 max abs diff | CR=4 same prediction | acc |\n"
    text += "|---|---:|---|---:|---:|---:|\n"
    for r in pixels:
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.0f} %"
        text += (
            f"| {r['set']} | {r['images']} | {r['size']} | {r['cr1_max_abs_diff']:.1e} | "
            f"{100 * r['cr4_same_prediction']:.0f} % | {acc} |\n"
        )
    print(text)
    record = {"fashion_mnist": result, "foolbox": pixels}
    common.save(args, "table_vit", record, text, lambda png: report.plot([(title, result)], png))


if __name__ == "__main__":
    common.run_script(main)
