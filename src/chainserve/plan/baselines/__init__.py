"""The paper's baselines (spec §3): PETALS' and BPRR's block placements, served by per-request path
routers (:mod:`chainserve.dispatch.petals_route`, :mod:`chainserve.dispatch.ws_rr`), and JFFC over
whole-model replicas (:mod:`.jffc_only`)."""
