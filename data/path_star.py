"""The path-star task (Bachmann & Nagarajan, ICML 2024, "The Pitfalls of Next-Token Prediction"):
given a star graph, a source and a goal, write the path from the source to the goal.

    data: {source: synthetic, task: {kind: path_star, degree: 2, path_len: 5, mode: forward}}

The format follows the official code, gregorbachmann/Next-Token-Failures (read at b925a1e):
`data/graphs.py` (`star_graph`, `generate_and_save`, `prefix_target_list`, `Graphs`) and
`tokenizing/numeral_tokenizer.py`.

Graph G(d, l): a source s with d arms, each a chain of l - 1 further nodes, so l nodes from s to
the arm's end; the goal g ends one arm. The 1 + d(l - 1) labels are distinct, drawn uniformly
from [0, N). Every edge is written parent first (u nearer the source), and the edge list is
shuffled as whole edges. One instance, after our BOS:

    u v | u v | ... | u v / s g = s a b ... g

the d(l - 1) edges with `|` between them, `/`, the source and the goal, `=`, then the path from s
to g, both ends included (l tokens). The official text has commas inside each edge and between
path nodes (`2,8|5,2|5,9|9,3/5,8=5,2,8`); its numeral tokenizer drops them, so each label is one
token. The prefix is 3 d(l - 1) + 3 tokens (27 for G(2, 5)), an instance 1 + 3 d(l - 1) + 3 + l.

Vocabulary, after PAD and BOS: the labels "0" ... "N-1", then "|", "=", "/", "$" (the numeral
tokenizer's order; N + 4 tokens as in the paper).

Loss: the l path tokens, the source included. `Graphs.__getitem__` sets the targets of the prefix
to -1 (ignored) and keeps every target token, the first of which is the source, although the
prefix already names it.

Modes (`mode`):

    forward      teacher forcing: the model reads the true path as it writes it.
    teacherless  the model's inputs at the path positions are `$` (`Graphs.__getitem__` sets
                 x[num_prefix_tokens:] to `$`), the targets stay the true path: every path token
                 is predicted from the prefix alone. The only task whose inputs are not the
                 targets shifted by one (`model_inputs`).
    reverse      the path written goal first, g ... s (`prefix_target_list(reverse=True)`); the
                 prefix keeps `/ s g =`. The positive control: walking back from the goal is one
                 edge lookup per token.

The official generator draws the labels one at a time by rejection (source, goal, the goal arm's
inner nodes, then the other arms) and builds the goal's arm first; here the labels are one draw
without replacement and arm 0 leads to the goal. Both give uniformly random distinct labels, and
after the shuffle nothing marks the goal's arm. The instances are not those of the published
files (another random stream).

Exact match on the path under teacher forcing is the paper's "forced" accuracy in forward and
reverse modes, not its accuracy when generating; in teacherless mode the two agree.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydantic

from .config import TaskConfig
from .synthetic import BOS_ID, FIRST_ID, _check_at_least

SEPARATORS = ("|", "=", "/", "$")
"""The tokens after the labels, in the official tokenizer's order: between edges, before the
path, before the source and goal, the teacherless filler."""


class PathStarConfig(TaskConfig):
    """Path-star graphs G(`degree`, `path_len`) over `num_nodes` labels: a shuffled edge list,
    the source and the goal, then the path between them (the answer). Label n is token "n"."""

    kind: Literal["path_star"] = "path_star"
    degree: int = 2
    """Arms at the source (d)."""
    path_len: int = 5
    """Nodes on each arm, the source included (l): the length of the answer."""
    num_nodes: int = 50
    """Labels in the vocabulary (N); the 1 + d(l - 1) nodes of an instance get distinct ones."""
    mode: Literal["forward", "teacherless", "reverse"] = "forward"
    """forward: teacher forcing; teacherless: the path's inputs are `$`; reverse: the path
    written goal to source."""

    @pydantic.model_validator(mode="after")
    def _check(self) -> PathStarConfig:
        _check_at_least(self, degree=1, path_len=2)
        nodes = 1 + self.num_edges
        if nodes > self.num_nodes:
            raise ValueError(
                f"data.task: G({self.degree}, {self.path_len}) has {nodes} nodes, more than "
                f"data.task.num_nodes={self.num_nodes} (the labels of an instance are distinct); "
                "raise num_nodes"
            )
        return self

    @property
    def num_edges(self) -> int:
        """d (l - 1): the edges of one graph."""
        return self.degree * (self.path_len - 1)

    @property
    def length(self) -> int:
        return 1 + 3 * self.num_edges + 3 + self.path_len

    def token_names(self) -> list[str]:
        return [str(n) for n in range(self.num_nodes)] + list(SEPARATORS)

    def separator_id(self, name: str) -> int:
        """The id of `name`, one of `SEPARATORS`."""
        return FIRST_ID + self.num_nodes + SEPARATORS.index(name)

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        d, arm, e = self.degree, self.path_len - 1, self.num_edges
        labels = FIRST_ID + rng.choice(self.num_nodes, 1 + e, replace=False)
        source = labels[0]
        chains_DL = np.concatenate([np.full((d, 1), source), labels[1:].reshape(d, arm)], axis=1)
        edges_E2 = np.stack([chains_DL[:, :-1].ravel(), chains_DL[:, 1:].ravel()], axis=1)
        edges_E2 = edges_E2[rng.permutation(e)]
        edge_list = np.concatenate([edges_E2, np.full((e, 1), self.separator_id("|"))], axis=1)
        path_L = chains_DL[0]  # arm 0 leads to the goal
        query = [self.separator_id("/"), source, path_L[-1], self.separator_id("=")]
        answer = path_L[::-1] if self.mode == "reverse" else path_L
        tokens = np.concatenate([[BOS_ID], edge_list.ravel()[:-1], query, answer]).astype(np.int32)
        return tokens, np.arange(len(tokens)) >= len(tokens) - self.path_len

    def model_inputs(self, tokens_L: np.ndarray, answer_L: np.ndarray) -> np.ndarray:
        if self.mode != "teacherless":
            return tokens_L
        return np.where(answer_L, self.separator_id("$"), tokens_L).astype(np.int32)
