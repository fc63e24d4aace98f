"""Is the direction of motion in the trained features at all? Linear probes on hand-made
correlation (cost-volume) features of a real-motion store, without any head.

    python benchmarks/real_motion.py --tasks reversal --folds 3 --seeds 0 --heads mean-linear  # makes the store
    python benchmarks/real_motion_probe.py /tmp/spool-real-motion/reversal-fold0/feats.zarr

For frames t and t + d, the mean over positions (per image quadrant) of the cosine between the
token at p in frame t and the token at p + shift in frame t + d, for every shift within R
rows and columns, summed over t: a global cost volume. Logistic regression (scikit-learn) on
it, trained and tested on disjoint photographs (the benchmark's three folds). What it reads
is what the Spool head's local correlation (``--correlation``) hands the head per token.

The second set of rows pools what the head's correlation now computes (spool.model.
LocalCorrelation): the cosines to frames t +- 1..d, standardised per token over its
neighbourhood or not, averaged over the frame plainly and weighted by the token's column and
row (the moments): which of these make the motion readable on unseen photographs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_motion import photo_folds  # noqa: E402


def load(path: str):
    from spool.stores import open_store

    with open_store(path) as store:
        clips, videos = store.clips(), store.videos()
        idx = np.flatnonzero(clips.done)
        x = store.read_patches(idx).astype(np.float32)  # (N, T, L, D)
        names = [str(videos.video_id[v]) for v in clips.video_index[idx]]
        return x, clips.label[idx], np.array([n.split("/")[-1].rsplit("_", 1)[0] for n in names])


def cost_volume(x: np.ndarray, d: int, r: int) -> np.ndarray:
    """(N, 4 * (2r+1)^2): per quadrant and shift, the mean cosine of frame t with frame t+d."""
    n, t, l, _ = x.shape
    g = int(round(l**0.5))
    z = x - x.mean(axis=(0, 1, 2))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    grid = z.reshape(n, t, g, g, -1)
    out = []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ya, yb, xa, xb = max(0, -dy), max(0, dy), max(0, -dx), max(0, dx)
            h, w = g - abs(dy), g - abs(dx)
            c = sum((grid[:, s, ya:ya + h, xa:xa + w] * grid[:, s + d, yb:yb + h, xb:xb + w]).sum(-1)
                    for s in range(t - d))  # fmt: skip
            out += [c[:, :h // 2, :w // 2].mean((1, 2)), c[:, :h // 2, w // 2:].mean((1, 2)),
                    c[:, h // 2:, :w // 2].mean((1, 2)), c[:, h // 2:, w // 2:].mean((1, 2))]  # fmt: skip
    return np.stack(out, 1)


def moment_features(x: np.ndarray, frames: int, r: int, token_norm: bool, moments: bool) -> np.ndarray:
    """(N, ...): per frame offset +-1..frames and shift within r, the token's cosine (standardised
    over its neighbourhood if ``token_norm``), averaged over tokens and time; with ``moments``
    also weighted by the token's column and row in [-1, 1]."""
    n, t, l, _ = x.shape
    g = int(round(l**0.5))
    z = x - x.mean(axis=(0, 1, 2))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    grid = z.reshape(n, t, g, g, -1)
    coord = (np.arange(g) - (g - 1) / 2) / ((g - 1) / 2)
    weights = [np.ones((g, g)), np.broadcast_to(coord[None, :], (g, g)), np.broadcast_to(coord[:, None], (g, g))]
    shifts = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    out = []
    for d in [o for k in range(1, frames + 1) for o in (k, -k)]:
        for s in range(t):
            if not 0 <= s + d < t:
                continue
            cos = np.zeros((n, g, g, len(shifts)), np.float32)
            inside = np.zeros((g, g, len(shifts)), np.float32)
            for i, (dy, dx) in enumerate(shifts):
                ya, yb, xa, xb = max(0, -dy), max(0, dy), max(0, -dx), max(0, dx)
                h, w = g - abs(dy), g - abs(dx)
                cos[:, ya:ya + h, xa:xa + w, i] = (grid[:, s, ya:ya + h, xa:xa + w] * grid[:, s + d, yb:yb + h, xb:xb + w]).sum(-1)
                inside[ya:ya + h, xa:xa + w, i] = 1
            if token_norm:
                count = inside.sum(-1, keepdims=True)
                mean = (cos * inside).sum(-1, keepdims=True) / count
                var = (((cos - mean) * inside) ** 2).sum(-1, keepdims=True) / count
                cos = (cos - mean) / np.sqrt(var + 1e-4) * inside
            out.append(np.stack([(cos * w[None, :, :, None]).mean((1, 2)) for w in weights[: 3 if moments else 1]], 1))
    # the sum over t of each offset's frames, as in cost_volume
    per_offset = np.split(np.stack(out, 1), np.cumsum([t - abs(d) for d in [o for k in range(1, frames + 1) for o in (k, -k)]])[:-1], axis=1)
    return np.concatenate([p.sum(1).reshape(n, -1) for p in per_offset], 1)


def probe(features: np.ndarray, y: np.ndarray, photo: np.ndarray, folds: list[list[str]]) -> list[float]:
    accs = []
    for test_photos in folds:
        test = np.isin(photo, test_photos)
        mu, sd = features[~test].mean(0), features[~test].std(0) + 1e-9
        fitted = LogisticRegression(max_iter=3000).fit((features[~test] - mu) / sd, y[~test])
        accs.append(fitted.score((features[test] - mu) / sd, y[test]))
    return accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args()
    x, y, photo = load(args.store)
    folds = photo_folds(sorted(set(photo)), args.folds)
    for name, (d, r) in {"frames t, t+1, shifts within 1": (1, 1), "frames t, t+2, shifts within 2": (2, 2)}.items():
        accs = probe(cost_volume(x, d, r), y, photo, folds)
        print(f"quadrants, {name}: test top-1 per fold {np.round(accs, 3).tolist()}, mean {np.mean(accs):.3f}")
    for r in (1, 2):
        for token_norm in (False, True):
            for moments in (False, True):
                accs = probe(moment_features(x, 2, r, token_norm, moments), y, photo, folds)
                name = f"frames t +- 1, 2, shifts within {r}, token norm {'on' if token_norm else 'off'}, " \
                       f"moments {'on' if moments else 'off'}"
                print(f"{name}: test top-1 per fold {np.round(accs, 3).tolist()}, mean {np.mean(accs):.3f}", flush=True)


if __name__ == "__main__":
    main()
