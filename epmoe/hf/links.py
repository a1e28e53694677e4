"""Which piece of which Hugging Face tensor fills which piece of which epmoe tensor.

A `Link` ties one HF tensor (or one expert's slice, or some rows of it) to one epmoe state-dict
entry (or one expert's row, or some rows of it). The family adapters (families.py) write the
links of a configuration; import and export (convert.py) only walk them, so one list answers
"what maps to what" both ways, and the completeness checks run on it before a byte is read:
every tensor in the files is taken by a link, every epmoe tensor is covered, every shape fits.

Layouts the links express: fused q/k/v (epmoe's one projection, HF's three), HF's [out, in]
Linear weights against epmoe's [E, in, out] stacked experts (transposed), the per-expert
tensors of published checkpoints, and the stacked [E, 2F, D] gate_up / [E, D, F] down tensors
that transformers >= 5 holds in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from epmoe.config import ConfigError


class HFError(ConfigError):
    """An import or export that cannot be done; the message names the tensor, key or file (a
    ConfigError: the CLIs print it in one line and exit 2)."""


@dataclass(frozen=True)
class Link:
    ours: str  # epmoe state-dict key
    theirs: str  # HF tensor name
    expert: int | None = None  # global expert id: `ours` is a stacked [E, ...] tensor and this is its row
    ours_rows: tuple[int, int] | None = None  # rows [a, b) of ours (after the expert row): fused q/k/v
    their_expert: bool = False  # theirs is stacked [E, ...] too: take its row `expert`
    their_rows: tuple[int, int] | None = None  # rows [a, b) of theirs (after its expert row): fused gate_up
    transpose: bool = False  # HF Linear [out, in] vs epmoe's stacked expert [in, out]


def piece_shape(link: Link, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the piece a link moves, as epmoe holds it, from the full epmoe tensor's shape."""
    shape = ours_shape[1:] if link.expert is not None else ours_shape
    if link.ours_rows is not None:
        shape = (link.ours_rows[1] - link.ours_rows[0], *shape[1:])
    return tuple(shape)


def their_shape(links: list[Link], ours_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape the HF tensor of `links` (all with the same `theirs`) must have."""
    first = links[0]
    piece = piece_shape(first, ours_shapes[first.ours])
    if first.transpose:
        piece = tuple(reversed(piece))
    if first.their_rows is not None:
        piece = (max(link.their_rows[1] for link in links), *piece[1:])
    if first.their_expert:
        piece = (len({link.expert for link in links}), *piece)
    return piece


def check_complete(
    links: list[Link], their_shapes: dict[str, tuple[int, ...]], ours_shapes: dict[str, tuple[int, ...]],
    ignored: dict[str, str],
) -> None:  # fmt: skip
    """Raise HFError naming the first tensor that is missing, left over, or of the wrong shape.

    their_shapes: every tensor in the files; ours_shapes: every epmoe state-dict entry of the
    full (single-device) model; ignored: HF names deliberately not imported, with the reason.
    """
    by_theirs: dict[str, list[Link]] = {}
    for link in links:
        by_theirs.setdefault(link.theirs, []).append(link)
    for name, group in by_theirs.items():
        if name not in their_shapes:
            raise HFError(f"missing tensor {name} (for epmoe's {group[0].ours}): the files do not hold it")
        expected = their_shape(group, ours_shapes)
        if tuple(their_shapes[name]) != expected:
            raise HFError(
                f"tensor {name} has shape {list(their_shapes[name])}, but epmoe's {group[0].ours} needs "
                f"{list(expected)}: the file does not match its config.json (or the tensor is swapped)"
            )
    for name in their_shapes:
        if name not in by_theirs and name not in ignored:
            raise HFError(f"unexpected tensor {name}: no epmoe parameter takes it (a layout this adapter lacks?)")
    covered: dict[str, int] = {}
    for link in links:
        n = 1
        for d in piece_shape(link, ours_shapes[link.ours]):
            n *= d
        covered[link.ours] = covered.get(link.ours, 0) + n
    for key, shape in ours_shapes.items():
        total = 1
        for d in shape:
            total *= d
        if covered.get(key, 0) != total:
            raise HFError(f"epmoe's {key} {list(shape)} is {'not' if key not in covered else 'partly'} "
                          "filled by the Hugging Face tensors")  # fmt: skip
