"""Train the one-class lesion detector (Faster R-CNN + Lite FPN) on tiles at the inference scale.

Sources: dermoscopy boxes (HAM10000), smartphone boxes (PAD-UFES-20), the real wide-field mole
photos and the synthetic wide-field train scenes, mixed by ``source_shares`` so a few thousand
tiles per epoch cover every kind of photo. SGD + warm-up + cosine, bf16 autocast, checkpoints
every few minutes, early stopping on validation recall/AP.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from torchvision.ops import box_iou
from tqdm.auto import tqdm

from lesiontriage.data.manifest import load_manifest, manifest_hash, resolve_path
from lesiontriage.data.torch_datasets import DetectionSample, DetectionTileDataset, decode_all
from lesiontriage.networks.detector import DetectorConfig, build_detector
from lesiontriage.paths import RUNS_DIR
from lesiontriage.train.common import (Timer, autocast, command_line, dataclass_from_dict, load_checkpoint, load_shipped_state,
                                       save_checkpoint, save_result, seed_everything)

log = logging.getLogger(__name__)

CLOSE_UP_SOURCES = ("ham10000", "pad_ufes20_subset")


@dataclass
class DetectorTrainConfig:
    name: str = "detector"
    network: dict[str, Any] = field(default_factory=dict)  # DetectorConfig fields
    source_shares: dict[str, float] = field(default_factory=lambda: {"ham10000": 0.25, "pad_ufes20_subset": 0.2, "moles_widefield_roujiaw": 0.25, "scenes": 0.3})
    scenes_dir: str = "runs/scenes"
    tile: int = 512
    batch_size: int = 4
    epoch_tiles: int = 1200
    epochs: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    bf16: bool = True
    seed: int = 0
    ckpt_every_steps: int = 50
    max_minutes: float = 70.0
    val_per_source: int = 60
    init_from: str = ""  # checkpoint (.pt with "model") to fine-tune from, or a shipped model key ("detector")


def load_scene_samples(scenes_dir: Path, split: str, limit: int | None = None) -> list[DetectionSample]:
    """Synthetic scenes of one split (index written by ``lesiontriage data scenes``)."""
    index = scenes_dir / split / "scenes.parquet"
    if not index.exists():
        log.warning("no synthetic scenes at %s", index)
        return []
    df = pd.read_parquet(index)
    if limit:
        df = df.head(limit)
    paths = [p if Path(p).is_absolute() else index.parent / Path(p).name for p in df["path"]]
    images = decode_all(paths)
    return [DetectionSample(img, np.asarray([list(b) for b in boxes], dtype=np.float32).reshape(-1, 4), "scenes", False,
                            c2_labels(mal))
            for img, boxes, mal in zip(images, df["boxes"], df["box_malignant"])]


def c2_labels(malignant) -> np.ndarray:
    """Per-box classes for the C=2 (benign / malignant) detector: 2 = malignant, 1 = benign.

    Boxes without a malignancy label are the wide-field mole photos' naevi (and the scenes'
    background moles taken from them): common acquired moles, labelled benign by assumption,
    which the report states."""
    m = np.asarray([np.nan if pd.isna(v) else float(v) for v in np.atleast_1d(np.asarray(malignant, dtype=object))],
                   dtype=float)
    return np.where(m == 1, 2, 1).astype(np.int64)


def load_manifest_samples(manifest: pd.DataFrame, split: str, sources: list[str], data_root: Path | None,
                          limit_per_source: int | None = None, seed: int = 0) -> list[DetectionSample]:
    rows = manifest[(manifest["split"] == split) & manifest["source"].isin(sources)]
    rows = rows[rows["boxes"].map(lambda b: b is not None and len(b) > 0)]
    if limit_per_source:
        rows = pd.concat([g.sample(min(len(g), limit_per_source), random_state=seed)
                          for _, g in rows.groupby("source", sort=True)])
    images = decode_all([resolve_path(p, data_root) for p in rows["path"]])
    return [DetectionSample(img, np.asarray([list(b) for b in boxes], dtype=np.float32).reshape(-1, 4), src,
                            src in CLOSE_UP_SOURCES, c2_labels([mal] * len(boxes)))
            for img, boxes, src, mal in zip(images, rows["boxes"], rows["source"], rows["malignant"])]


@torch.no_grad()
def detection_recall(model, samples: list[DetectionSample], score_thr: float = 0.3) -> dict[str, float]:
    """Recall at IoU > 0 and IoU >= 0.5 (score >= thr) per source; whole images at inference scale."""
    model.eval()
    hits: dict[str, list[tuple[int, int, int]]] = {}
    for s in tqdm(samples, desc="val", leave=False):
        x = torch.from_numpy(np.ascontiguousarray(s.rgb)).permute(2, 0, 1).float() / 255
        out = model([x])[0]
        keep = out["scores"] >= score_thr
        pred = out["boxes"][keep]
        gt = torch.from_numpy(s.boxes)
        if len(gt) == 0:
            continue
        if len(pred):
            iou = box_iou(gt, pred).max(1).values
        else:
            iou = torch.zeros(len(gt))
        hits.setdefault(s.source, []).append((int((iou > 0).sum()), int((iou >= 0.5).sum()), len(gt)))
    res = {}
    for src, rows in hits.items():
        a = np.array(rows)
        res[f"{src}/recall_iou0"] = float(a[:, 0].sum() / a[:, 2].sum())
        res[f"{src}/recall_iou50"] = float(a[:, 1].sum() / a[:, 2].sum())
    vals = [v for k, v in res.items() if k.endswith("recall_iou50")]
    res["macro_recall_iou50"] = float(np.mean(vals)) if vals else 0.0
    return res


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


class DetectorTrainer:
    def __init__(self, cfg: DetectorTrainConfig, manifest_path: Path | None = None, data_root: Path | None = None) -> None:
        self.cfg = cfg
        self.net_cfg = DetectorConfig.from_dict(cfg.network)
        self.run_dir = RUNS_DIR / cfg.name
        seed_everything(cfg.seed)
        self.manifest = load_manifest(manifest_path)
        self.manifest_hash = manifest_hash(self.manifest)
        srcs = [s for s in cfg.source_shares if s != "scenes"]
        log.info("loading detector training images")
        train = load_manifest_samples(self.manifest, "train", srcs, data_root)
        train += load_scene_samples(Path(cfg.scenes_dir), "train")
        self.train_samples = train
        val = load_manifest_samples(self.manifest, "val", srcs, data_root, limit_per_source=cfg.val_per_source, seed=cfg.seed)
        val += load_scene_samples(Path(cfg.scenes_dir), "val", limit=cfg.val_per_source // 2)
        self.val_samples = val
        self.ds = DetectionTileDataset(train, long_side=self.net_cfg.long_side, tile=cfg.tile, seed=cfg.seed,
                                       class_labels=self.net_cfg.num_classes == 2)
        src = np.array([s.source for s in train])
        w = np.zeros(len(train))
        for name, share in cfg.source_shares.items():
            m = src == name
            if m.any():
                w[m] = share / m.sum()
        self.weights = w / w.sum()
        self.model = build_detector(self.net_cfg, pretrained=True)
        self.steps_per_epoch = cfg.epoch_tiles // cfg.batch_size

    def _train_mode_scale(self) -> None:
        # Tiles are already at the inference scale: the model's own resize must be the identity.
        self.model.transform.min_size = (self.cfg.tile,)
        self.model.transform.max_size = self.cfg.tile

    def _eval_mode_scale(self) -> None:
        self.model.transform.min_size = (self.net_cfg.long_side,)
        self.model.transform.max_size = self.net_cfg.long_side

    def _score_start_point(self, best_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Validation recall of the init_from weights, saved as best.pt (epoch -1)."""
        self._eval_mode_scale()
        rec = detection_recall(self.model, self.val_samples)
        print(f"start point ({self.cfg.init_from}): {rec}", flush=True)
        save_checkpoint(best_path, model=self.model.state_dict(), epoch=-1, val=rec)
        entry = {"epoch": -1, "init_from": self.cfg.init_from, "val": rec, "improved": True, "minutes": 0.0}
        return [entry], {"score": rec["macro_recall_iou50"], "epoch": -1, "val": rec}

    def fit(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        total = cfg.epochs * self.steps_per_epoch
        lr_at = lambda s: (min(1.0, (s + 1) / cfg.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        ckpt_path, best_path = self.run_dir / "checkpoint.pt", self.run_dir / "best.pt"
        start_epoch, start_step, history, best = 0, 0, [], {"score": -1.0, "epoch": -1}
        state = load_checkpoint(ckpt_path) if resume else None
        if not state and cfg.init_from:
            shipped = not cfg.init_from.endswith(".pt")
            if shipped:  # continue the shipped model: it is the first "best", so the run must beat it
                init = {"model": load_shipped_state(cfg.init_from)}
            else:
                init = load_checkpoint(Path(cfg.init_from))
            if init is None:
                raise FileNotFoundError(f"{cfg.init_from}: init_from checkpoint not found")
            own = self.model.state_dict()
            compatible = {k: v for k, v in init["model"].items() if k in own and own[k].shape == v.shape}
            self.model.load_state_dict(compatible, strict=False)
            skipped = sorted(set(own) - set(compatible))
            log.info("fine-tuning from %s (%d tensors re-initialised: %s)", cfg.init_from, len(skipped), skipped[:4])
            if shipped:
                history, best = self._score_start_point(best_path)
        if state:
            self.model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start_epoch, start_step, history, best = state["epoch"], state["step"], state["history"], state["best"]
        timer = Timer()
        for epoch in range(start_epoch, cfg.epochs):
            rng = np.random.default_rng(cfg.seed * 7919 + epoch)
            order = rng.choice(len(self.train_samples), size=self.steps_per_epoch * cfg.batch_size, p=self.weights)
            draws = [(int(i), epoch * 1_000_000 + k) for k, i in enumerate(order)]
            step0 = start_step if epoch == start_epoch else 0
            loader = DataLoader(_LazyTiles(self.ds, draws[step0 * cfg.batch_size:]),
                                batch_size=cfg.batch_size, shuffle=False, num_workers=1, collate_fn=_collate)
            self.model.train()
            self._train_mode_scale()
            bar = tqdm(loader, desc=f"detector epoch {epoch + 1}/{cfg.epochs}", initial=step0, total=self.steps_per_epoch)
            run = None
            for step, (images, targets) in enumerate(bar, start=step0):
                with autocast(cfg.bf16):
                    losses = self.model(images, targets)
                loss = sum(v.float() for v in losses.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
                sched.step()
                run = loss.item() if run is None else 0.95 * run + 0.05 * loss.item()
                bar.set_postfix(loss=f"{run:.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
                if (step + 1) % cfg.ckpt_every_steps == 0:
                    save_checkpoint(ckpt_path, model=self.model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                                    epoch=epoch, step=step + 1, history=history, best=best)
                if timer.elapsed > cfg.max_minutes * 60:
                    break
            self._eval_mode_scale()
            rec = detection_recall(self.model, self.val_samples)
            improved = rec["macro_recall_iou50"] > best["score"]
            history.append({"epoch": epoch, "train_loss": run, "val": rec, "improved": improved, "minutes": timer.elapsed / 60})
            print(f"detector epoch {epoch}: {rec}", flush=True)
            if improved:
                best = {"score": rec["macro_recall_iou50"], "epoch": epoch, "val": rec}
                save_checkpoint(best_path, model=self.model.state_dict(), epoch=epoch, val=rec)
            save_checkpoint(ckpt_path, model=self.model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                            epoch=epoch + 1, step=0, history=history, best=best)
            if timer.elapsed > cfg.max_minutes * 60:
                break
        return {"history": history, "best": best, "run_dir": str(self.run_dir)}


class _LazyTiles(torch.utils.data.Dataset):
    """A fixed list of (sample index, draw) pairs, rendered on access (in the loader worker)."""

    def __init__(self, ds: DetectionTileDataset, draws: list[tuple[int, int]]) -> None:
        self.ds, self.draws = ds, draws

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, k: int):
        return self.ds[self.draws[k]]


def run_training(config_path: str, resume: bool = False, manifest: Path | None = None, data_root: Path | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from lesiontriage.train.common import load_toml

    raw = load_toml(config_path)
    raw.update(overrides or {})
    cfg = dataclass_from_dict(DetectorTrainConfig, raw)
    trainer = DetectorTrainer(cfg, manifest_path=manifest, data_root=data_root)
    out = trainer.fit(resume=resume)
    out["config"] = asdict(cfg)
    out["command"] = command_line()
    out["manifest_hash"] = trainer.manifest_hash
    save_result(trainer.run_dir, out)
    return out
