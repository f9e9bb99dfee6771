"""Method registry (spec §2–§3): a method's name → its offline layout and its online dispatcher.

* ``proposed``: c-search over GBP-CR + GCA (§2.3), JFFC over the chains (§2.4);
* ``proposed:<policy>``: the same chains under another load-balancing policy of
  ``chainserve.dispatch.registry.POLICIES`` (SED, JSQ, JIQ, random, threshold-JFFC …; §3, §4.3);
* ``petals``: PETALS' placement and client routing; ``bprr``: CG-BP placement and WS-RR routing
  (``bprr:R=<n>`` fixes its sessions per block R instead of its rule);
* ``jffc-only``: whole-model replicas under JFFC.

Layouts are built once per problem; :func:`dispatcher_for` (``MethodSetup.make_dispatcher``) gives a
fresh dispatcher (its own state) for every run and every plan change, so runs never share queues.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from chainserve.dispatch.base import Dispatcher
from chainserve.dispatch.petals_route import PetalsRouter
from chainserve.dispatch.registry import POLICIES
from chainserve.dispatch.ws_rr import WsRrRouter
from chainserve.model.spec import Problem, SpecError
from chainserve.plan.baselines.bprr import bprr_placement
from chainserve.plan.baselines.jffc_only import jffc_only_plan
from chainserve.plan.baselines.petals import petals_placement
from chainserve.plan.baselines.types import PathPlacement
from chainserve.plan.best import PLANNERS, plan_with
from chainserve.plan.types import Layout, Plan


@dataclass(frozen=True, slots=True)
class MethodSetup:
    """``method``: the method's name; ``plan_or_placement``: a :class:`Plan` (chain methods) or a
    :class:`PathPlacement` (path routers); ``description``: one line for reports."""

    method: str
    plan_or_placement: Plan | PathPlacement
    description: str

    def make_dispatcher(self, rng: np.random.Generator, page_tokens: int | None = None) -> Dispatcher:
        """A fresh dispatcher (its own state) over the layout: :func:`dispatcher_for`."""
        return dispatcher_for(self.method, self.plan_or_placement, rng, page_tokens=page_tokens)


def dispatcher_for(
    method: str,
    layout: Layout,
    rng: np.random.Generator,
    *,
    page_tokens: int | None = None,
    tokens_per_slot: int | None = None,
) -> Dispatcher:
    """The online dispatcher of ``method`` over ``layout`` (§2.4, §3), the one the simulator, the
    runtime and the experiments all drive: JFFC over a plan's chains (``proposed``, ``jffc-only``),
    ``proposed:<policy>``'s policy, PETALS' or WS-RR's router over a path placement. ``rng`` feeds the
    randomised policies. ``SpecError`` (field ``method``) when the method does not serve the layout.

    ``page_tokens``: the KV cache by tokens (issue 30), in pages of that many tokens: each of c_k's
    slots (each server's pool) holds ``model.max_tokens`` tokens and a job reserves its own prompt +
    output tokens (:mod:`chainserve.dispatch.base`); ``None`` (or ``max_tokens`` unknown): the paper's
    model, one max-length slot per job, which the paper's experiments reproduce. ``tokens_per_slot``:
    the tokens a slot holds where the block servers' block-slots differ from ``model.max_tokens`` (the
    runtime's ``serve --max-tokens``).

    >>> from chainserve.model.spec import ModelSpec, Server, Workload
    >>> p = Problem((Server("a", 20, 0.5, 0.1),), ModelSpec("toy", 3, 2.0, 1.0), Workload(0.2))
    >>> plan = build_method("jffc-only", p, np.random.default_rng(0)).plan_or_placement
    >>> [dispatcher_for(m, plan, np.random.default_rng(0)).name for m in ("proposed", "proposed:jsq")]
    ['jffc', 'jsq']
    """
    base, policy = check_method_name(method)
    max_tokens = tokens_per_slot or layout.problem.model.max_tokens
    tokens_per_slot = None if page_tokens is None else max_tokens
    if isinstance(layout, PathPlacement):
        routers = {"petals": PetalsRouter, "bprr": WsRrRouter}
        if base not in routers:
            raise SpecError(
                "method", f"the plan is a {layout.method} path placement; serve it with --method {layout.method}"
            )
        return routers[base](layout, tokens_per_slot, page_tokens or 1)
    if base in ("petals", "bprr"):
        raise SpecError("method", f"{base} needs its own placement; plan it from the cluster file instead")
    return POLICIES[policy or "jffc"](
        layout.chains, rng, layout.problem.arrival_rate_per_s, tokens_per_slot, page_tokens or 1
    )


def check_method_name(name: str) -> tuple[str, str | None]:
    """Split ``name`` into (method, policy or ``None``); raise ``SpecError`` (field ``method`` or
    ``policy``) for an unknown one. Cheap: callers use it to fail before any planning.

    >>> check_method_name("proposed:sed"), check_method_name("petals"), check_method_name("bprr:R=3")
    (('proposed', 'sed'), ('petals', None), ('bprr', None))
    """
    base, sep, policy = name.partition(":")
    if base not in METHODS:
        raise SpecError(
            "method", f"unknown method {name!r}; known: {', '.join(METHODS)}, proposed:<policy>, bprr:R=<n>"
        )
    if not sep:
        return base, None
    if base == "bprr":
        bprr_sessions_option(name)
        return base, None
    if base != "proposed":
        raise SpecError("method", f"only proposed takes a policy, got {name!r}")
    if policy not in POLICIES:
        raise SpecError("policy", f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    return base, policy


def bprr_sessions_option(name: str) -> int | None:
    """BPRR's R fixed by the method name ``bprr:R=<n>`` (``None`` without one); ``SpecError``
    (field ``method``) for a malformed option.

    >>> bprr_sessions_option("bprr:R=4"), bprr_sessions_option("bprr"), bprr_sessions_option("petals")
    (4, None, None)
    """
    base, sep, option = name.partition(":")
    if base != "bprr" or not sep:
        return None
    match = re.fullmatch(r"R=([1-9][0-9]{0,5})", option)
    if match is None:
        raise SpecError("method", f"bprr takes R=<sessions per block, 1..999999>, got {name!r}")
    return int(match.group(1))


def _proposed(problem: Problem, rng: np.random.Generator, policy: str = "jffc", planner: str = "greedy") -> MethodSetup:
    plan = plan_with(planner, problem)
    how = f"GBP-CR + GCA with c* = {plan.c}" if planner == "greedy" else "best planner"
    name = "proposed" if policy == "jffc" else f"proposed:{policy}"
    return MethodSetup(name, plan, f"{how} ({len(plan.chains)} chains, {plan.num_job_servers} job servers), {policy}")


def _petals(problem: Problem, rng: np.random.Generator) -> MethodSetup:
    layout = petals_placement(problem, rng)
    return MethodSetup("petals", layout, f"PETALS placement ({'; '.join(layout.notes)}), min-latency client routing")


def _bprr(problem: Problem, rng: np.random.Generator, sessions: int | None = None) -> MethodSetup:
    layout = bprr_placement(problem, sessions)
    return MethodSetup("bprr", layout, f"BPRR: CG-BP placement ({'; '.join(layout.notes)}), WS-RR routing")


def _jffc_only(problem: Problem, rng: np.random.Generator) -> MethodSetup:
    plan = jffc_only_plan(problem)
    return MethodSetup("jffc-only", plan, f"whole-model replicas on {len(plan.chains)} servers, JFFC")


METHODS: dict[str, Callable[[Problem, np.random.Generator], MethodSetup]] = {
    "proposed": _proposed,
    "petals": _petals,
    "bprr": _bprr,
    "jffc-only": _jffc_only,
}


def build_method(name: str, problem: Problem, rng: np.random.Generator, planner: str = "greedy") -> MethodSetup:
    """Build method ``name`` (a key of :data:`METHODS`, ``proposed:<policy>`` or ``bprr:R=<n>``) for ``problem``;
    ``rng`` drives randomised placements (PETALS' join order); ``planner`` (``greedy``, the paper's, or
    ``best``, :func:`chainserve.plan.best.best_plan`) plans the proposed chains. Raises ``ValueError`` for an unknown
    name or a method that does not apply (e.g. ``jffc-only`` when no server fits the model).

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 20, 0.5, 0.1), Server("b", 20, 1.0, 0.1)), ModelSpec("toy", 3, 2.0, 1.0),
    ...             Workload(0.2))
    >>> setup = build_method("jffc-only", p, np.random.default_rng(0))
    >>> setup.description, setup.make_dispatcher(np.random.default_rng(1)).name
    ('whole-model replicas on 2 servers, JFFC', 'jffc')
    """
    base, policy = check_method_name(name)
    if planner not in PLANNERS:
        raise SpecError("planner", f"unknown planner {planner!r}; known: {', '.join(PLANNERS)}")
    if base == "proposed":
        return _proposed(problem, rng, policy or "jffc", planner)
    if base == "bprr":
        return _bprr(problem, rng, bprr_sessions_option(name))
    return METHODS[base](problem, rng)
