"""Train the lesion malignancy classifier (crops) or the direct whole-image baseline.

Recipe (seed 003 + DESIGN.md section 5): a head warm-up on the frozen trunk, then full
fine-tuning with AdamW + one-cycle, bf16 autocast, class-weighted losses (binary malignant +
8-way sub-type), source-balanced sampling so the small clinical / smartphone sets are seen,
early stopping on validation AUC (macro over sources, so HAM10000 cannot dominate the choice),
then temperature scaling fitted on validation. The best epoch is exported to ``models/``.
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
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lesiontriage.data.manifest import load_manifest, manifest_hash
from lesiontriage.data.seven_point import CRITERIA as SEVEN_POINT_CRITERIA
from lesiontriage.data.seven_point import masked_bce, seven_point_targets
from lesiontriage.data.torch_datasets import LesionImageDataset
from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier
from lesiontriage.paths import RUNS_DIR
from lesiontriage.results import SUBTYPES
from lesiontriage.train.common import (Timer, autocast, command_line, dataclass_from_dict, load_checkpoint, load_shipped_state,
                                       save_checkpoint, save_result, seed_everything)

log = logging.getLogger(__name__)


@dataclass
class ClassifierTrainConfig:
    """One training run. Values live in train/configs/*.toml."""

    name: str = "classifier"
    mode: str = "crop"  # crop | whole
    network: dict[str, Any] = field(default_factory=dict)  # ClassifierConfig fields
    sources: list[str] = field(default_factory=lambda: ["ham10000", "pad_ufes20_subset", "derm7pt", "sd198_tumour_subset"])
    source_shares: dict[str, float] = field(default_factory=lambda: {"ham10000": 0.5, "pad_ufes20_subset": 0.2, "derm7pt": 0.22, "sd198_tumour_subset": 0.08})
    epoch_samples: int = 6400
    batch_size: int = 32
    warmup_epochs: int = 1  # frozen trunk, heads only
    epochs: int = 4  # full fine-tuning epochs after warm-up
    lr: float = 6e-4
    head_lr: float = 3e-3
    weight_decay: float = 1e-4
    subtype_loss_weight: float = 0.5
    label_smoothing: float = 0.05
    bf16: bool = True
    num_workers: int = 1
    seed: int = 0
    ckpt_every_steps: int = 100
    max_minutes: float = 70.0
    patience: int = 2
    export_key: str = ""  # key in models/metadata.json (default: classifier / image_classifier by mode)
    init_from: str = ""  # a model key in models/metadata.json to continue from (sha256-verified) instead of ImageNet
    # Crop mode: share of boxed training rows shown as the whole photo instead of the box crop. The product's
    # close-up score leans on the lesion classifier run on the whole photo (hybrid.py, full-frame view).
    whole_frame_prob: float = 0.0
    # Crop mode: sources whose box-less rows get the shipped detector's box (data/pseudo_boxes.py), so the classifier
    # trains on the crop the product shows it; those rows show the whole photo with ``pseudo_whole_prob`` instead
    # (the full-frame view of the close-up blend still runs this classifier on whole photos).
    pseudo_box_sources: list[str] = field(default_factory=list)
    pseudo_whole_prob: float = 0.5
    # Weight of an auxiliary loss: predict derm7pt's seven dermoscopic criteria (data/seven_point.py) from either photo
    # of a case, through a training-only head on the pooled features (not exported). 0 = off.
    seven_point_weight: float = 0.0
    # Weight of a pairwise ranking loss on the malignant logit, over (malignant, benign) pairs of the same source and
    # modality within a batch (``within_stratum_rank_loss``). Why: every target is an AUC *per data set*, and the
    # BCE term also spends capacity ranking one source's photos against another's. 0 = off.
    rank_loss_weight: float = 0.0


class IndexedSamples(torch.utils.data.Dataset):
    """A dataset's samples with their row index appended, for per-row targets kept outside the dataset."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        return (*self.dataset[i], i)


def within_stratum_rank_loss(logits: torch.Tensor, y: torch.Tensor, strata: torch.Tensor) -> torch.Tensor:
    """Mean softplus(-(z_pos - z_neg)) over every (malignant, benign) pair that shares a stratum.

    A smooth surrogate of 1 - AUC computed inside each stratum (source x modality), so the gradient only asks the
    network to order photos that a per-data-set AUC compares. Soft labels (label smoothing) count as malignant above
    0.5. Zero, with a gradient, when the batch holds no such pair."""
    pos = y > 0.5
    same = strata[:, None] == strata[None, :]
    pairs = same & pos[:, None] & ~pos[None, :]
    if not bool(pairs.any()):
        return logits.sum() * 0.0
    margins = logits[:, None] - logits[None, :]
    return nn.functional.softplus(-margins[pairs]).mean()


def _sample_weights(rows: pd.DataFrame, shares: dict[str, float]) -> np.ndarray:
    """Per-row sampling weight so each source takes its share of an epoch."""
    w = np.zeros(len(rows))
    for src, share in shares.items():
        mask = (rows["source"] == src).to_numpy()
        if mask.any():
            w[mask] = share / mask.sum()
    if (w == 0).any():  # sources without a share: weight of an average row
        w[w == 0] = w[w > 0].mean() if (w > 0).any() else 1.0
    return w / w.sum()


def _loss_weights(rows: pd.DataFrame, weights: np.ndarray) -> tuple[float, torch.Tensor]:
    """pos_weight for BCE and sub-type class weights (inverse sqrt frequency) under the sampling."""
    y = rows["malignant"].astype(float).to_numpy()
    p_pos = float((weights * y).sum())
    pos_weight = float(np.clip((1 - p_pos) / max(p_pos, 1e-3), 0.5, 6.0))
    freq = np.array([weights[(rows["diagnosis"] == c).to_numpy()].sum() for c in SUBTYPES])
    cw = np.where(freq > 0, 1 / np.sqrt(np.maximum(freq, 1e-6)), 0.0)
    cw = cw / cw[freq > 0].mean()
    return pos_weight, torch.tensor(cw, dtype=torch.float32)


def select_rows(manifest: pd.DataFrame, split: str, sources: list[str]) -> pd.DataFrame:
    """Labelled rows (malignant known, diagnosis a sub-type) of the given split and sources."""
    m = manifest[(manifest["split"] == split) & manifest["source"].isin(sources)]
    m = m[m["malignant"].notna() & m["diagnosis"].isin(SUBTYPES)]
    return m.reset_index(drop=True)


def strata_auc(rows: pd.DataFrame, p: np.ndarray) -> dict[str, float]:
    """AUC per source x modality (>= 5 positives and negatives) plus their macro mean and pooled."""
    out: dict[str, float] = {}
    y = rows["malignant"].astype(int).to_numpy()
    keys = rows["source"] + "/" + rows["modality"]
    for k in sorted(keys.unique()):
        m = (keys == k).to_numpy()
        if y[m].sum() >= 5 and (1 - y[m]).sum() >= 5:
            out[k] = float(roc_auc_score(y[m], p[m]))
    pooled = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    # Macro over strata; with no stratum large enough (tiny data), the pooled AUC stands in.
    out["macro"] = float(np.mean(list(out.values()))) if out else pooled
    out["pooled"] = pooled
    return out


@torch.no_grad()
def predict_logits(model: LesionClassifier, ds: LesionImageDataset, batch_size: int = 64, bf16: bool = True,
                   flip_tta: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Malignant logits [N] and sub-type logits [N, 8] (mean over identity + flips when flip_tta)."""
    model.eval()
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    mal, sub = [], []
    for x, _, _ in tqdm(loader, desc="predict", leave=False):
        x = x.contiguous(memory_format=torch.channels_last)
        views = [x, x.flip(-1), x.flip(-2)] if flip_tta else [x]
        with autocast(bf16):
            outs = [model(v) for v in views]
        mal.append(torch.stack([o[0].float() for o in outs]).mean(0))
        sub.append(torch.stack([o[1].float() for o in outs]).mean(0))
    return torch.cat(mal).numpy(), torch.cat(sub).numpy()


class ClassifierTrainer:
    """Owns one run folder ``runs/<name>/``: checkpoint.pt, best.pt, history.json."""

    def __init__(self, cfg: ClassifierTrainConfig, manifest_path: Path | None = None, data_root: Path | None = None) -> None:
        self.cfg = cfg
        self.net_cfg = ClassifierConfig.from_dict(cfg.network)
        self.run_dir = RUNS_DIR / cfg.name
        self.manifest = load_manifest(manifest_path)
        self.manifest_hash = manifest_hash(self.manifest)
        self.data_root = data_root
        seed_everything(cfg.seed)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.train_rows = select_rows(self.manifest, "train", cfg.sources)
        self.val_rows = select_rows(self.manifest, "val", cfg.sources)
        if cfg.pseudo_box_sources and cfg.mode == "crop":
            self.train_rows, self.val_rows = self._with_pseudo_boxes(self.train_rows, self.val_rows)
        common = dict(input_size=self.net_cfg.input_size, mean=self.net_cfg.mean, std=self.net_cfg.std, mode=cfg.mode,
                      margin=self.net_cfg.crop_margin, data_root=data_root)
        log.info("decoding %d train + %d val images", len(self.train_rows), len(self.val_rows))
        whole_prob = np.full(len(self.train_rows), cfg.whole_frame_prob)
        if "pseudo_box" in self.train_rows:
            whole_prob[self.train_rows["pseudo_box"].to_numpy(bool)] = cfg.pseudo_whole_prob
        self.train_ds = LesionImageDataset(self.train_rows, train=True, seed=cfg.seed, whole_frame_prob=whole_prob,
                                           **common)
        self.val_ds = LesionImageDataset(self.val_rows, train=False, **common)
        self.weights = _sample_weights(self.train_rows, cfg.source_shares)
        pos_weight, cw = _loss_weights(self.train_rows, self.weights)
        self.bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
        self.ce = nn.CrossEntropyLoss(weight=cw, label_smoothing=cfg.label_smoothing, ignore_index=-100)
        self.model = LesionClassifier(self.net_cfg, pretrained=not cfg.init_from).to(memory_format=torch.channels_last)
        if cfg.init_from:
            self.model.load_state_dict(load_shipped_state(cfg.init_from))
        self.steps_per_epoch = cfg.epoch_samples // cfg.batch_size
        # Stratum code per training row (source x modality), for the ranking loss.
        strata = (self.train_rows["source"] + "/" + self.train_rows["modality"]).astype("category")
        self.row_strata = torch.from_numpy(strata.cat.codes.to_numpy().astype(np.int64))
        # Training-only auxiliary head (seven_point_weight > 0): never part of the exported weights.
        self.aux_head: nn.Module | None = None
        if cfg.seven_point_weight > 0:
            self.aux_targets = torch.from_numpy(seven_point_targets(self.train_rows))
            self.aux_head = nn.Linear(self.model.trunk.num_features, len(SEVEN_POINT_CRITERIA))
            print(f"seven-point auxiliary loss (weight {cfg.seven_point_weight}) on "
                  f"{int((~torch.isnan(self.aux_targets)).any(1).sum())} training rows", flush=True)

    def _with_pseudo_boxes(self, *splits: pd.DataFrame) -> list[pd.DataFrame]:
        """Each split's rows with the shipped detector's pseudo-boxes for ``pseudo_box_sources`` (cached per
        detector; built here when missing, ~0.2 s per photo)."""
        from lesiontriage.data.pseudo_boxes import apply_pseudo_boxes, build_pseudo_boxes, pipeline_cache_path
        from lesiontriage.pipeline import TriagePipeline

        pipe = TriagePipeline.from_dir(load_image_classifier=False)
        wanted = pd.concat([r[r["source"].isin(self.cfg.pseudo_box_sources)] for r in splits], ignore_index=True)
        table = build_pseudo_boxes(pipe, wanted, pipeline_cache_path(pipe), self.data_root)
        out = [apply_pseudo_boxes(r, table, self.cfg.pseudo_box_sources) for r in splits]
        for name, r in zip(("train", "val"), out):
            log.info("%s: %d rows cropped by a pseudo-box", name, int(r["pseudo_box"].sum()))
            print(f"{name}: {int(r['pseudo_box'].sum())} of {len(r)} rows cropped by a detector pseudo-box", flush=True)
        return out

    def _epoch_indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(self.cfg.seed * 1000 + epoch)
        return rng.choice(len(self.train_rows), size=self.steps_per_epoch * self.cfg.batch_size, replace=True, p=self.weights)

    def _optimizer(self, warmup: bool):
        heads = [p for h in [*self.model.heads(), *([self.aux_head] if self.aux_head is not None else [])]
                 for p in h.parameters()]
        if warmup:
            for p in self.model.trunk.parameters():
                p.requires_grad_(False)
            return torch.optim.AdamW(heads, lr=self.cfg.head_lr, weight_decay=self.cfg.weight_decay)
        for p in self.model.trunk.parameters():
            p.requires_grad_(True)
        return torch.optim.AdamW([
            {"params": list(self.model.trunk.parameters()), "lr": self.cfg.lr},
            {"params": heads, "lr": self.cfg.head_lr / 3},
        ], weight_decay=self.cfg.weight_decay)

    def _aux_state(self) -> dict[str, torch.Tensor] | None:
        return self.aux_head.state_dict() if self.aux_head is not None else None

    def _score_start_point(self, best_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Validation AUC of the init_from weights, saved as best.pt (epoch -1)."""
        mal_logits, _ = predict_logits(self.model, self.val_ds, bf16=self.cfg.bf16, flip_tta=False)
        aucs = strata_auc(self.val_rows, mal_logits)
        print(f"start point ({self.cfg.init_from}): val AUC macro {aucs['macro']:.4f} pooled {aucs['pooled']:.4f}", flush=True)
        save_checkpoint(best_path, model=self.model.state_dict(), epoch=-1, val_auc=aucs)
        entry = {"epoch": -1, "warmup": False, "init_from": self.cfg.init_from, "val_auc": aucs, "improved": True, "minutes": 0.0}
        return [entry], {"score": aucs["macro"], "epoch": -1, "val_auc": aucs}

    def _loss(self, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Binary + weighted sub-type loss, plus the seven-point auxiliary and the ranking loss when they are on."""
        cfg = self.cfg
        with autocast(cfg.bf16):
            mal, subl, f = self.model.forward_with_features(x)
            aux = self.aux_head(f) if self.aux_head is not None else None
        loss = self.bce(mal.float(), y) + cfg.subtype_loss_weight * self.ce(subl.float(), s)
        if aux is not None:
            loss = loss + cfg.seven_point_weight * masked_bce(aux.float(), self.aux_targets[rows])
        if cfg.rank_loss_weight > 0:
            loss = loss + cfg.rank_loss_weight * within_stratum_rank_loss(mal.float(), y, self.row_strata[rows])
        return loss

    def fit(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        ckpt_path, best_path = self.run_dir / "checkpoint.pt", self.run_dir / "best.pt"
        total_epochs = cfg.warmup_epochs + cfg.epochs
        state = load_checkpoint(ckpt_path) if resume else None
        start_epoch, start_step, history, best = 0, 0, [], {"score": -1.0, "epoch": -1}
        if state:
            self.model.load_state_dict(state["model"])
            if self.aux_head is not None and state.get("aux_head"):
                self.aux_head.load_state_dict(state["aux_head"])
            start_epoch, start_step, history, best = state["epoch"], state["step"], state["history"], state["best"]
            log.info("resuming at epoch %d step %d", start_epoch, start_step)
        if not state and cfg.init_from:
            # A continuation must beat the model it starts from, so that model is the first "best".
            history, best = self._score_start_point(best_path)
        timer = Timer()
        bad_epochs = sum(1 for h in history if h.get("improved") is False and h["epoch"] > best["epoch"])
        for epoch in range(start_epoch, total_epochs):
            warm = epoch < cfg.warmup_epochs
            opt = self._optimizer(warm)
            sched = None
            if not warm:
                ft_steps = cfg.epochs * self.steps_per_epoch
                sched = torch.optim.lr_scheduler.OneCycleLR(
                    opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=ft_steps, pct_start=0.15,
                    div_factor=10, final_div_factor=100)
            if state and epoch == start_epoch and "opt" in state and state.get("warm") == warm:
                opt.load_state_dict(state["opt"])
                if sched is not None and state.get("sched"):
                    sched.load_state_dict(state["sched"])
            elif sched is not None and epoch > cfg.warmup_epochs:  # re-entering mid-schedule without state
                for _ in range((epoch - cfg.warmup_epochs) * self.steps_per_epoch):
                    sched.step()
            idx = self._epoch_indices(epoch)
            step0 = start_step if epoch == start_epoch else 0
            sub = IndexedSamples(self.train_ds, idx[step0 * cfg.batch_size:].tolist())
            loader = DataLoader(sub, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                                drop_last=True, persistent_workers=False)
            self.model.train()
            if warm:
                self.model.trunk.eval()  # frozen trunk: keep its batch-norm statistics
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{total_epochs}{' (warm-up)' if warm else ''}", initial=step0,
                       total=self.steps_per_epoch)
            run_loss = 0.0
            for step, (x, y, s, rows) in enumerate(bar, start=step0):
                loss = self._loss(x.contiguous(memory_format=torch.channels_last), y, s, rows)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
                opt.step()
                if sched is not None:
                    sched.step()
                run_loss = 0.95 * run_loss + 0.05 * loss.item() if step > step0 else loss.item()
                bar.set_postfix(loss=f"{run_loss:.3f}")
                if (step + 1) % cfg.ckpt_every_steps == 0:
                    save_checkpoint(ckpt_path, model=self.model.state_dict(), opt=opt.state_dict(),
                                    sched=sched.state_dict() if sched else None, warm=warm, epoch=epoch,
                                    step=step + 1, history=history, best=best, aux_head=self._aux_state())
                if timer.elapsed > cfg.max_minutes * 60:
                    log.warning("time cap of %.0f min reached in epoch %d", cfg.max_minutes, epoch)
                    break
            mal_logits, _ = predict_logits(self.model, self.val_ds, bf16=cfg.bf16, flip_tta=False)
            aucs = strata_auc(self.val_rows, mal_logits)
            improved = aucs["macro"] > best["score"]
            history.append({"epoch": epoch, "warmup": warm, "train_loss": run_loss, "val_auc": aucs,
                            "improved": improved, "minutes": timer.elapsed / 60})
            log.info("epoch %d val AUC %s", epoch, aucs)
            print(f"epoch {epoch}: val AUC macro {aucs['macro']:.4f} pooled {aucs['pooled']:.4f} {aucs}", flush=True)
            if improved:
                best = {"score": aucs["macro"], "epoch": epoch, "val_auc": aucs}
                save_checkpoint(best_path, model=self.model.state_dict(), epoch=epoch, val_auc=aucs)
                bad_epochs = 0
            elif not warm:
                bad_epochs += 1
            save_checkpoint(ckpt_path, model=self.model.state_dict(), epoch=epoch + 1, step=0, history=history, best=best,
                            aux_head=self._aux_state())
            if timer.elapsed > cfg.max_minutes * 60 or bad_epochs >= cfg.patience:
                break
        return {"history": history, "best": best, "run_dir": str(self.run_dir)}


def run_training(config_path: str, resume: bool = False, manifest: Path | None = None, data_root: Path | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Entry point used by ``lesiontriage train classifier|image-classifier``."""
    from lesiontriage.train.common import load_toml

    raw = load_toml(config_path)
    raw.update(overrides or {})
    cfg = dataclass_from_dict(ClassifierTrainConfig, raw)
    trainer = ClassifierTrainer(cfg, manifest_path=manifest, data_root=data_root)
    out = trainer.fit(resume=resume)
    out["config"] = asdict(cfg)
    out["command"] = command_line()
    out["manifest_hash"] = trainer.manifest_hash
    save_result(trainer.run_dir, out)
    return out
