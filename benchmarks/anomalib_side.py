#!/usr/bin/env python
"""anomalib's side of ``benchmarks/whole_process.py``; run with the python of anomalib's own venv.

    python anomalib_side.py import                       # only the imports a predict needs (timed by the caller)
    python anomalib_side.py fit-test --data BOTTLE --work DIR --weights LITE0.pth

``fit-test`` fits anomalib's PaDiM with the same backbone as ours (tf_efficientnet_lite0, feature levels
1, 2, 3, 120 channels kept; the lite0 ImageNet weights file given through timm's
``pretrained_cfg_overlay``, as nothing can be downloaded here), runs ``Engine.test`` on the MVTec split,
then measures its warm predict rate on the test images (decode, its pre-processor, model, post-processor;
after one warm-up pass). Prints one JSON line.
"""

from __future__ import annotations

import sys
import time

T0 = time.perf_counter()


def imports():
    import torch  # noqa: F401
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Padim

    return MVTecAD, Engine, Padim


def with_weights(path: str) -> None:
    """timm loads pretrained weights from ``path`` instead of the hub."""
    import timm

    create = timm.create_model

    def create_model(name, *args, **kwargs):
        if kwargs.get("pretrained"):
            kwargs["pretrained_cfg_overlay"] = {"file": path}
        return create(name, *args, **kwargs)

    timm.create_model = create_model  # anomalib's extractor calls timm.create_model through the module


def fit_test(data: str, work: str, weights: str) -> dict:
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    MVTecAD, Engine, Padim = imports()
    import_s = time.perf_counter() - T0
    with_weights(weights)
    t = time.perf_counter()
    root = Path(data)
    dm = MVTecAD(root=str(root.parent), category=root.name, train_batch_size=32, eval_batch_size=32, num_workers=0)
    model = Padim(backbone="tf_efficientnet_lite0", layers=[1, 2, 3], n_features=120)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=work, enable_progress_bar=False)
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    results = engine.test(model=model, datamodule=dm, verbose=False)
    test_s = time.perf_counter() - t
    images = sorted((root / "test").rglob("*.png"))
    model.eval()

    def predict_all() -> None:
        with torch.inference_mode():
            for i in range(0, len(images), 16):
                batch = []
                for p in images[i:i + 16]:
                    arr = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                    batch.append(arr.float() / 255.0)
                x = torch.stack(batch)
                x = model.pre_processor(x) if model.pre_processor is not None else x
                out = model.model(x)
                if model.post_processor is not None:
                    model.post_processor(out)

    predict_all()  # warm-up
    t = time.perf_counter()
    predict_all()
    warm = time.perf_counter() - t
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    return {"import_s_in_process": round(import_s, 3), "setup_s": round(setup_s, 3), "fit_s": round(fit_s, 3),
            "test_s": round(test_s, 3), "images": len(images), "warm_predict_ips": round(len(images) / warm, 2),
            "metrics": metrics, "torch_threads": torch.get_num_threads()}


def main() -> int:
    if sys.argv[1] == "import":
        imports()
        return 0
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--weights", required=True)
    args = ap.parse_args()
    out = fit_test(args.data, args.work, args.weights)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
