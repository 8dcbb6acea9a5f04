r"""One training run: nuP MLP + SGD with depthwise scaling, measured as docs/theory.md §4 says.

Usage (one configuration of the workflow config, outside Snakemake):
    python -m beyond_eos.train --configfile config/config.yaml --r 2 \
        --scaling normalized --eta 1 --seed 0 [--set train.epochs=1 ...] [--out DIR]
Writes DIR/config.json, DIR/metrics.csv, DIR/instruments.npz and DIR/summary.json
(schemas in docs/outputs.md). A run that diverges is a result, not an error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from beyond_eos import measures, model
from beyond_eos.config import ConfigError, RunConfig, load_config, run_config, run_id
from beyond_eos.scaling import get_scaling

log = logging.getLogger("beyond_eos.train")

N_CLASSES = 10


def select_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def set_determinism(threads: int, device: torch.device) -> None:
    """Same config, seed and machine -> the same bytes (README, "Determinism").

    Fixes torch's thread count and, through threadpoolctl, the BLAS behind numpy/scipy
    (Lanczos): a sum split over another number of threads rounds differently.
    """
    from threadpoolctl import threadpool_limits

    if device.type == "cuda":
        # cuBLAS needs a fixed workspace to be deterministic; must precede its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


def derived_seed(seed: int, stream: int) -> int:
    """Independent seeds for init, sampling and probe from one user seed."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def log_steps(total: int, count: int) -> list[int]:
    """Step 0 and about ``count`` log-spaced steps up to total - 1 (empty when count is 0)."""
    if count <= 0 or total <= 0:
        return []
    pts = np.geomspace(1, max(total - 1, 1), num=max(count - 1, 1))
    return sorted({0, *(int(round(p)) for p in pts)} & set(range(total)))


def metric_columns(depth: int) -> list[str]:
    """Fixed columns of metrics.csv for a network with ``depth`` hidden layers."""
    L = range(depth + 1)  # weight matrices k = 0..l
    hid = range(1, depth + 1)  # hidden layers k = 1..l
    cols = ["step", "epoch", "loss", "acc"]
    cols += [f"fwd_{k}" for k in hid] + [f"bwd_{k}" for k in range(1, depth + 2)]
    cols += [f"xi_{k}" for k in L] + [f"T1_{k}" for k in L]
    cols += [f"upd_{k}" for k in L] + [f"cum_{k}" for k in L] + [f"cos_{k}" for k in L]
    cols += [f"srank_{k}" for k in hid] + [f"stable_{k}" for k in hid]
    cols += ["sharpness", "sharpness_pre", "eos_ratio"]
    cols += ["dL_actual", "dL_1", "dL_2", "dL_3"]
    cols += ["test_loss", "test_acc"]
    return cols


def fmt(v) -> str:
    """Exact, deterministic text for a CSV cell; empty when not measured."""
    if v is None:
        return ""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return repr(float(v))


@torch.no_grad()
def evaluate(weights, x, y, a, b, chunk: int = 10000) -> tuple[float, float]:
    """Mean loss and accuracy on a full set, in chunks to bound memory."""
    tot_loss, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        z = model.logits(weights, x[i : i + chunk], a, b)
        tot_loss += float(model.cross_entropy(z, y[i : i + chunk])) * len(z)
        correct += int((z.argmax(1) == y[i : i + chunk]).sum())
    return tot_loss / len(y), correct / len(y)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Trainer:
    """State of one run; ``run()`` trains to the end, checkpointing as it goes."""

    def __init__(self, cfg: RunConfig, out_dir: Path):
        from beyond_eos.data import load_mnist

        self.cfg, self.out = cfg, Path(out_dir)
        self.device = select_device(cfg.device)
        set_determinism(cfg.threads, self.device)
        self.dtype = getattr(torch, cfg.dtype)

        # data, on the device once (MNIST is small)
        log.info("loading MNIST from %s", cfg.data_root)
        xtr, ytr = load_mnist(cfg.data_root, train=True, n=cfg.n_train)
        xte, yte = load_mnist(cfg.data_root, train=False, n=cfg.n_test)
        put = lambda t: t.to(self.device)
        self.xtr, self.ytr = put(xtr.to(self.dtype)), put(ytr)
        self.xte, self.yte = put(xte.to(self.dtype)), put(yte)
        self.n_train = len(ytr)

        # network (docs/theory.md §1)
        self.widths = model.layer_widths(784, cfg.depth, cfg.width, cfg.r, N_CLASSES)
        self.alphas = model.multipliers(self.widths, cfg.a, cfg.b)
        self.alphas_t = torch.tensor(self.alphas, dtype=torch.float64)
        g_init = torch.Generator().manual_seed(derived_seed(cfg.seed, 0))
        self.W = model.init_weights(self.widths, g_init, self.dtype, self.device)
        self.W0 = [w.clone() for w in self.W]
        self.rule = get_scaling(cfg.scaling)

        # fixed probe batch for feature ranks and sharpness
        g_probe = torch.Generator().manual_seed(derived_seed(cfg.seed, 2))
        probe = torch.randperm(self.n_train, generator=g_probe)[: cfg.probe_size].to(self.device)
        self.xp, self.yp = self.xtr[probe], self.ytr[probe]

        # schedule
        self.spe = self.n_train // cfg.batch_size  # full batches per epoch
        self.total = cfg.epochs * self.spe
        if cfg.max_steps is not None:
            self.total = min(self.total, cfg.max_steps)
        self.taylor_full = set(log_steps(self.total, cfg.taylor_full_points))
        self.sharp_steps = set(log_steps(self.total, cfg.sharpness_points))

        # mutable state (everything a checkpoint must hold)
        self.g_sample = torch.Generator().manual_seed(derived_seed(cfg.seed, 1))
        self.perm = None
        self.step = 0
        self.cols = metric_columns(cfg.depth)  # fixed for the run; built once, not per step
        self.rows: list[list[str]] = []
        self.inst: dict[str, list] = {}
        self.status, self.diverged_step, self.collapsed_step = "ok", None, None
        self.v0 = {}  # warm starts for Lanczos, per operator
        # seconds spent in each instrument: logged, never saved (outputs stay byte-identical)
        self.seconds = dict.fromkeys(("first_order", "sharpness", "taylor"), 0.0)

    # ---- checkpoints -------------------------------------------------------------------

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {
            "config": self.cfg.inputs_dict(),
            "step": self.step,
            "W": [w.cpu() for w in self.W],
            "perm": self.perm,
            "g_sample": self.g_sample.get_state(),
            "rows": self.rows,
            "inst": self.inst,
            "status": (self.status, self.diverged_step, self.collapsed_step),
            "v0": self.v0,
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(self.ckpt_path, buf.getvalue())

    def try_resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        try:
            state = torch.load(self.ckpt_path, weights_only=False)
        except Exception as err:  # a torn or foreign file: the run is still recoverable
            log.warning("unreadable checkpoint %s (%s); starting afresh", self.ckpt_path, err)
            return False
        if state["config"] != self.cfg.inputs_dict():
            log.warning("checkpoint %s is for another config; starting afresh", self.ckpt_path)
            return False
        self.step, self.perm, self.rows = state["step"], state["perm"], state["rows"]
        self.W = [w.to(self.device) for w in state["W"]]
        self.g_sample.set_state(state["g_sample"])
        self.inst, self.v0 = state["inst"], state["v0"]
        self.status, self.diverged_step, self.collapsed_step = state["status"]
        log.info("resumed from checkpoint at step %d of %d", self.step, self.total)
        return True

    # ---- one step ----------------------------------------------------------------------

    def batch(self, t: int):
        """Minibatch of step t: epochs of seeded shuffles, full batches only."""
        B = self.cfg.batch_size
        i = t % self.spe
        if i == 0 or self.perm is None:
            self.perm = torch.randperm(self.n_train, generator=self.g_sample)
        idx = self.perm[i * B : (i + 1) * B].to(self.device)
        return self.xtr[idx], self.ytr[idx]

    def train_step(self, t: int) -> bool:
        """Run step t; False when the run diverged (and must stop)."""
        cfg, W, a, b = self.cfg, self.W, self.cfg.a, self.cfg.b
        x, y = self.batch(t)
        n = len(y)
        measure = t % cfg.measure_every == 0 or t == self.total - 1
        rec: dict[str, float] = {"step": t, "epoch": t // self.spe}

        # forward; stop at once on a non-finite or huge loss (docs/theory.md §3 divergence)
        H, Z = model.forward(W, x, a, b, self.alphas)
        loss = float(model.cross_entropy(Z[-1], y))
        rec["loss"] = loss
        rec["acc"] = float((Z[-1].argmax(1) == y).float().mean())
        if not math.isfinite(loss) or loss > cfg.divergence_bound:
            self.status, self.diverged_step = "diverged", t
            self.rows.append(self.row(rec))
            log.warning("diverged at step %d: minibatch loss %r", t, loss)
            return False

        # backward signals and the gradient factorization G_k = alpha_k/n D_(k+1)^T H_k
        D = model.backward(W, H, Z, y, a, b, self.alphas)
        G = model.gradients(H, D, self.alphas)

        # depthwise scaling from the per-layer norms: tau_k = eta * xi_k
        h_norms = torch.stack([h.double().norm() for h in H]).cpu()
        d_norms = torch.stack([d.double().norm() for d in D[1:]]).cpu()
        xi = self.rule(h_norms, d_norms, self.alphas_t, n)
        tau = cfg.eta * xi

        clock = time.perf_counter()
        if measure:
            self.measure_batch(rec, H, D, h_norms, d_norms, xi)
            self.measure_probe(rec, t)
            clock = self.tick("first_order", clock)
        if cfg.sharpness_points and t in self.sharp_steps:
            self.measure_sharpness(rec, t, xi)
            clock = self.tick("sharpness", clock)
        taylor = cfg.taylor_every > 0 and t % cfg.taylor_every == 0
        if taylor:
            loss_before = self.measure_taylor_before(rec, t, x, y, G, tau)
            clock = self.tick("taylor", clock)

        # SGD step with the scaled gradient
        for k in range(len(W)):
            step_k = tau[k].item() * G[k]
            if measure:
                rec[f"upd_{k}"] = measures.frob_sq(step_k) ** 0.5
                rec[f"cos_{k}"] = measures.cosine(-step_k, W[k] - self.W0[k])
            W[k] -= step_k

        if taylor:
            # actual change of the same minibatch's loss across the step
            clock = time.perf_counter()
            with torch.no_grad():
                new = float(model.loss([w.double() for w in W], x.double(), y, a, b))
            rec["dL_actual"] = new - loss_before
            self.inst.setdefault("d_actual", []).append(rec["dL_actual"])
            self.tick("taylor", clock)

        if (t + 1) % self.spe == 0 or t == self.total - 1:
            rec["test_loss"], rec["test_acc"] = evaluate(W, self.xte, self.yte, a, b)
            log.info(
                "step %d (epoch %d): loss %.4f, test loss %.4f, test acc %.4f",
                t, rec["epoch"], loss, rec["test_loss"], rec["test_acc"],
            )
        self.rows.append(self.row(rec))
        return True

    def tick(self, key: str, since: float) -> float:
        """Add the time since ``since`` to instrument ``key``; return now."""
        now = time.perf_counter()
        self.seconds[key] += now - since
        return now

    def row(self, rec: dict) -> list[str]:
        return [fmt(rec.get(c)) for c in self.cols]

    # ---- instruments -------------------------------------------------------------------

    def measure_batch(self, rec, H, D, h_norms, d_norms, xi) -> None:
        """Forward/backward norms, xi, T1 by the Gram form, cumulative updates (theory §4)."""
        n = H[0].shape[0]
        for k in range(1, len(H)):
            rec[f"fwd_{k}"] = float(h_norms[k] ** 2) / (n * H[k].shape[1])
        for k in range(1, len(D)):
            rec[f"bwd_{k}"] = float(d_norms[k - 1] ** 2) / n
        for k in range(len(self.W)):
            rec[f"xi_{k}"] = float(xi[k])
            rec[f"T1_{k}"] = measures.grad_sqnorm_gram(H[k], D[k + 1], self.alphas[k])
            rec[f"cum_{k}"] = measures.frob_sq(self.W[k] - self.W0[k])

    @torch.no_grad()
    def measure_probe(self, rec, t: int) -> None:
        """Soft and stable rank of every hidden layer's features on the probe batch."""
        H, _ = model.forward(self.W, self.xp, self.cfg.a, self.cfg.b, self.alphas)
        for k in range(1, len(H)):
            rec[f"srank_{k}"], rec[f"stable_{k}"] = measures.feature_ranks(H[k])
        # a dead network: every last-hidden-layer unit zero on the whole probe batch
        if not bool(H[-1].any()) and self.collapsed_step is None:
            self.collapsed_step = t
            if self.status == "ok":
                self.status = "collapsed"
            log.warning("collapsed at step %d: last hidden layer is zero on the probe", t)

    def measure_sharpness(self, rec, t: int, xi) -> None:
        """lambda_max of the probe Hessian; for scaled runs also of P^1/2 H P^1/2, P = xi."""
        lam = self.top_eigenvalue("plain", None)
        rec["sharpness"] = lam
        lam_pre = lam if self.cfg.scaling == "none" else self.top_eigenvalue("pre", xi.tolist())
        rec["sharpness_pre"] = lam_pre
        # the effective step is eta * xi_k per layer: stability asks eta * lambda_pre < 2
        rec["eos_ratio"] = self.cfg.eta * lam_pre / 2
        for key, v in (("sharp_steps", t), ("sharpness", lam), ("sharpness_pre", lam_pre)):
            self.inst.setdefault(key, []).append(v)
        self.inst.setdefault("eos_ratio", []).append(rec["eos_ratio"])

    def top_eigenvalue(self, key: str, precond) -> float:
        """Lanczos warm-started from this operator's last eigenvector; NaN if it fails.

        A failure (no convergence, a non-finite Hessian just before a divergence) is logged
        and recorded as NaN: an instrument must not end the run it observes.
        """
        from beyond_eos.sharpness import sharpness

        cfg = self.cfg
        v0 = self.v0.get(key)
        if v0 is not None and not (np.all(np.isfinite(v0)) and np.any(v0)):
            v0 = None
        try:
            m = cfg.sharpness_probe or cfg.probe_size
            lam, vec = sharpness(
                [w.double() for w in self.W], self.xp[:m].double(), self.yp[:m], cfg.a, cfg.b,
                precond=precond, v0=v0, tol=cfg.lanczos_tol, maxiter=cfg.lanczos_maxiter,
            )
        except (RuntimeError, ValueError, ArithmeticError) as err:
            log.warning("sharpness (%s) failed at step %d: %s", key, self.step, err)
            return float("nan")
        self.v0[key] = vec
        return lam

    def measure_taylor_before(self, rec, t, x, y, G, tau) -> float:
        """T1, T2 and the jet T3[tau,tau,tau] on this minibatch; predictions at orders 1-3.

        Returns the minibatch loss in float64, against which the step's actual change is taken.
        """
        from beyond_eos import taylor

        cfg = self.cfg
        Wd = [w.double() for w in self.W]
        xd, Gd = x.double(), [g.double() for g in G]
        jet = taylor.taylor_directional(Wd, xd, y, tau, cfg.a, cfg.b, grads=Gd)
        T1, T2, T3 = taylor.taylor_coefficients(
            Wd, xd, y, cfg.a, cfg.b, grads=Gd, order=3 if t in self.taylor_full else 2
        )
        rec["dL_1"], rec["dL_2"], rec["dL_3"] = jet["d1"], jet["d2"], jet["d3"]
        inst = self.inst
        for key, v in (
            ("taylor_steps", t),
            ("tau", tau.numpy()),
            ("T1", T1.cpu().numpy()),
            ("T2", T2.cpu().numpy()),
            ("jet3", jet["t3_tau"]),
            ("d_pred", np.array([jet["d1"], jet["d2"], jet["d3"]])),
        ):
            inst.setdefault(key, []).append(v)
        if T3 is not None:
            inst.setdefault("T3_steps", []).append(t)
            inst.setdefault("T3", []).append(T3.cpu().numpy())
        return jet["loss"]

    # ---- driver ------------------------------------------------------------------------

    def run(self) -> dict:
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        self.try_resume()
        log.info(
            "training %s: widths %s, %d steps (%d per epoch) on %s",
            self.out.name, self.widths[1:-1], self.total, self.spe, self.device,
        )
        bar = tqdm(
            total=self.total, initial=self.step, disable=not sys.stderr.isatty(), leave=False
        )
        ce = self.cfg.checkpoint_every
        start = time.perf_counter()
        while self.step < self.total and self.status != "diverged":
            ok = self.train_step(self.step)
            self.step += 1
            bar.update(1)
            if ok and ce and self.step % ce == 0 and self.step < self.total:
                self.save_checkpoint()
        bar.close()
        # Wall time stays out of the result files (they must be byte-identical across reruns).
        total = time.perf_counter() - start
        spent = " ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        second = self.seconds["sharpness"] + self.seconds["taylor"]
        log.info(
            "wall %.1f s; instruments: %s; second-order overhead %.1f%% of the rest",
            total, spent, 100 * second / max(total - second, 1e-9),
        )
        return self.finish()

    def finish(self) -> dict:
        """Write metrics.csv, instruments.npz and summary.json, then drop the checkpoint."""
        a, b = self.cfg.a, self.cfg.b
        cols = self.cols
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        w.writerows(self.rows)
        atomic_write(self.out / "metrics.csv", buf.getvalue().encode())

        arrays = {k: np.asarray(v) for k, v in self.inst.items()}
        npz = io.BytesIO()
        np.savez(npz, **dict(sorted(arrays.items())))
        atomic_write(self.out / "instruments.npz", npz.getvalue())

        summary = self.summary(cols, a, b)
        text = json.dumps(summary, indent=2, allow_nan=False)  # NaN is written as null
        atomic_write(self.out / "summary.json", (text + "\n").encode())
        self.ckpt_path.unlink(missing_ok=True)
        log.info("finished %s: status %s", self.out.name, self.status)
        return summary

    def summary(self, cols, a, b) -> dict:
        cfg = self.cfg
        last = {c: "" for c in cols}
        for row in self.rows:  # last measured value of every column
            last.update({c: v for c, v in zip(cols, row) if v != ""})
        num = lambda c: float(last[c]) if last[c] != "" else None
        eos = self.inst.get("eos_ratio", [])
        s = {
            "run_id": run_id(cfg.r, cfg.scaling, cfg.eta, cfg.seed),
            "r": cfg.r, "scaling": cfg.scaling, "eta": cfg.eta, "seed": cfg.seed,
            "status": self.status,
            "diverged_step": self.diverged_step,
            "collapsed_step": self.collapsed_step,
            "steps": len(self.rows),
            "total_steps": self.total,
            "final_train_loss": None, "final_train_acc": None,
            "test_loss": None, "test_acc": None,
            "srank_last": num(f"srank_{cfg.depth}"),
            "stable_rank_last": num(f"stable_{cfg.depth}"),
            "sharpness_init": self.inst["sharpness"][0] if eos else None,
            "sharpness_last": num("sharpness"),
            "eos_ratio_init": eos[0] if eos else None,
            "eos_ratio_last": num("eos_ratio"),
            "max_eos_ratio": float(np.nanmax(eos)) if np.isfinite(eos).any() else None,
        }
        if self.status != "diverged":
            loss, acc = evaluate(self.W, self.xtr, self.ytr, a, b)
            if not math.isfinite(loss) or loss > cfg.divergence_bound:
                # the last update blew up: no later step was there to see it
                s["status"], s["diverged_step"] = "diverged", self.total
                self.status, self.diverged_step = "diverged", self.total
                log.warning("diverged after the last step: training loss %r", loss)
            else:
                s["final_train_loss"], s["final_train_acc"] = loss, acc
                s["test_loss"], s["test_acc"] = num("test_loss"), num("test_acc")
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in s.items()}


def train(cfg: RunConfig, out_dir: str | Path) -> dict:
    """Train one configuration into out_dir (resuming from its checkpoint if present)."""
    cfg = replace(
        cfg,
        extra={
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "device": str(select_device(cfg.device)),
            "torch_threads": cfg.threads,
        },
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", cfg.to_json().encode())
    return Trainer(cfg, out).run()


def parse_sets(items: list[str]) -> dict:
    """--set key.sub=value pairs; values parsed as YAML (numbers, null, lists)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-config", help="JSON of a RunConfig (what the workflow passes)")
    src.add_argument("--configfile", help="workflow YAML config; pick a point with --r etc.")
    p.add_argument("--r", type=float)
    p.add_argument("--scaling")
    p.add_argument("--eta", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], help="override, e.g. train.epochs=1")
    # Not results/runs/: that folder belongs to the workflow, which must not mistake a
    # hand-made run for one of its own.
    p.add_argument("--out", help="output folder (default: results/single/<run id>)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.run_config:
            cfg = RunConfig(**json.loads(args.run_config))
        else:
            missing = [k for k in ("r", "scaling", "eta", "seed") if getattr(args, k) is None]
            if missing:
                p.error(f"--configfile needs --{' --'.join(missing)}")
            config = load_config(args.configfile, parse_sets(args.set))
            cfg = run_config(config, args.r, args.scaling, args.eta, args.seed)
    except ConfigError as err:  # bad input: say what and how to fix, no traceback
        log.error("%s", err)
        return 2
    out = args.out or Path("results") / "single" / run_id(cfg.r, cfg.scaling, cfg.eta, cfg.seed)
    train(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
