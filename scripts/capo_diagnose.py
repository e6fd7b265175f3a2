"""Which tokens does CAPO reject, and what does the kept update do? A few real steps, every token recorded.

Runs ``capo fit`` with the given configs plus a recorder callback, then prints, per step, the rejection rate
by advantage sign and by the sampled token's probability under the sampling policy, and the mean advantage-
weighted probability change direction of what is kept. Used for issue 12's CAPO degeneration (docs/results.md).
    .venv/bin/python scripts/capo_diagnose.py OUT_DIR -- --config conf/quickstart.yaml \\
        --config conf/selector/capo.yaml --model.optimizer.init_args.lr=6e-5 --trainer.max_steps=4 \\
        --trainer.limit_val_batches=0
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

BUCKETS = ((0.0, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.01))  # sampled-token probability pi(a)


class TokenRecorder(L.Callback):
    """Saves each step's per-token sampled probability, advantage, shifts, tests and mask to <folder>/step<k>.pt."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        selection = outputs["selection"]
        adv = outputs["advantages"]
        adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(selection.judged)
        judged = selection.judged
        record = {
            "prob": batch.behavior_logprobs.exp()[judged].cpu(),
            "adv": adv[judged].cpu(),
            "fisher": selection.shifts["token_fisher"][judged].cpu(),
            "hessian": selection.shifts["token_hessian"][judged].cpu(),
            "failed_f": selection.failed["fisher"][judged].cpu(),
            "failed_h": selection.failed["hessian"][judged].cpu(),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.folder / f"step{trainer.global_step}.pt")


def summarize(folder: Path) -> str:
    lines = []
    for path in sorted(folder.glob("step*.pt"), key=lambda p: int(p.stem[4:])):
        r = torch.load(path)
        rejected = r["failed_f"] | r["failed_h"]
        moving = r["adv"] != 0
        lines.append(f"{path.stem}: {int(moving.sum())} of {len(moving)} tokens have a non-zero advantage")
        for name, sel in (("A>0", r["adv"] > 0), ("A<0", r["adv"] < 0)):
            lines.append(f"  {name}: {int(sel.sum()):5d} tokens, rejected {_rate(rejected, sel)}")
            for low, high in BUCKETS:
                in_bucket = sel & (r["prob"] >= low) & (r["prob"] < high)
                lines.append(
                    f"    pi(a) in [{low:.1f}, {min(high, 1.0):.1f}): {int(in_bucket.sum()):5d} tokens, rejected "
                    f"{_rate(rejected, in_bucket)}, median m_F {_median(r['fisher'], in_bucket)}"
                )
        kept = moving & ~rejected
        # the kept update raises pi(a) of kept A>0 tokens and lowers it for kept A<0 tokens; weight by |A|
        down = (r["adv"][kept & (r["adv"] < 0)].abs() * r["prob"][kept & (r["adv"] < 0)]).sum()
        up = (r["adv"][kept & (r["adv"] > 0)].abs() * r["prob"][kept & (r["adv"] > 0)]).sum()
        lines.append(f"  kept |A|-weighted pi(a): pushed up {float(up):.2f}, pushed down {float(down):.2f}")
    return "\n".join(lines)


def _rate(rejected: torch.Tensor, sel: torch.Tensor) -> str:
    n = int(sel.sum())
    return f"{int((rejected & sel).sum()) / n:6.1%}" if n else "     -"


def _median(values: torch.Tensor, sel: torch.Tensor) -> str:
    return f"{float(values[sel].median()):.2e}" if int(sel.sum()) else "-"


def main(argv: list[str]) -> None:
    out, rest = Path(argv[0]), argv[argv.index("--") + 1 :]
    sys.path.insert(0, str(Path(__file__).parent))
    from capo_lightning.commands.cli import main as capo

    spec = {"class_path": "capo_diagnose.TokenRecorder", "init_args": {"folder": str(out / "tokens")}}
    recorder = f"--trainer.callbacks+={spec}"
    capo(["fit", *rest, f"--trainer.default_root_dir={out}", recorder])
    print(summarize(out / "tokens"))


if __name__ == "__main__":
    main(sys.argv[1:])
