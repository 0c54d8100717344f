"""A calibrated guard: SAS curve, prober and refusal head for one model, saved as one folder.

    guard/
      guard.json               model identity, split layer, tau, eps, metrics, data provenance
      sas.json, sas.png        the SAS curve
      prober.json, prober.npz  the prober (standardisation folded in)
      refusal.json, refusal_transform.npy
      answer.json, answer.npz  the answer guard, when calibrated with one (answer_guard.py)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SteerguardError
from .answer_guard import AnswerProber
from .prober import Prober
from .refusal import RefusalHead
from .sas import SASResult

GUARD_SCHEMA = 1
FILES = ("guard.json", "sas.json", "prober.json", "prober.npz", "refusal.json", "refusal_transform.npy")


@dataclass
class Guard:
    model: dict                 # name, source, sha256, architecture, num_layers, hidden_size, vocab_size
    split_layer: int
    sas: SASResult
    prober: Prober
    refusal: RefusalHead
    calibration: dict = field(default_factory=dict)   # data provenance and sizes
    metrics: dict = field(default_factory=dict)
    answer: AnswerProber | None = None                 # watches the answer as it is written

    def save(self, folder: str | Path) -> Path:
        """Write atomically: a half-written guard never sits at `folder` looking complete."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.sas.save(tmp)
        self.sas.plot(tmp / "sas.png", self.split_layer)
        self.prober.save(tmp)
        self.refusal.save(tmp)
        if self.answer is not None:
            self.answer.save(tmp)
        (tmp / "guard.json").write_text(json.dumps(
            {"schema": GUARD_SCHEMA, "model": self.model, "split_layer": self.split_layer,
             "tau": self.prober.tau, "eps": self.refusal.eps, "calibration": self.calibration,
             "metrics": self.metrics}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Guard":
        folder = Path(folder)
        if not folder.is_dir():
            raise SteerguardError(f"{folder}: no such guard folder (make one with `steerguard calibrate`)")
        missing = [f for f in FILES if not (folder / f).exists()]
        if missing:
            raise SteerguardError(f"{folder} is not a complete guard: missing {', '.join(missing)}")
        try:
            meta = json.loads((folder / "guard.json").read_text())
            if meta.get("schema") != GUARD_SCHEMA:
                raise SteerguardError(f"{folder / 'guard.json'}: guard schema {meta.get('schema')}, "
                                      f"this steerguard reads {GUARD_SCHEMA}; recalibrate")
            return cls(model=meta["model"], split_layer=meta["split_layer"], sas=SASResult.load(folder),
                       prober=Prober.load(folder), refusal=RefusalHead.load(folder),
                       calibration=meta.get("calibration", {}), metrics=meta.get("metrics", {}),
                       answer=AnswerProber.load(folder))
        except SteerguardError:
            raise
        except (ValueError, KeyError, OSError) as e:
            raise SteerguardError(f"{folder}: corrupt guard ({type(e).__name__}: {e}); recalibrate") from e

    def check_model(self, lm) -> None:
        """Refuse to guard a model the guard was not calibrated on."""
        if lm.sha256 != self.model["sha256"]:
            raise SteerguardError(f"this guard was calibrated on {self.model['name']} "
                                  f"(sha256 {self.model['sha256'][:12]}...), not on {lm.source}")
