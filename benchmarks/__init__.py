"""epmoe's benchmarks. Run each script from the repository root as a module, e.g.
`.venv/bin/python -m benchmarks.layer --steps 3`; what scripts share lives in `workloads.py`
(the layer, its workloads and one-process timing), `rank_harness.py` (two expert-parallel ranks),
`netns.py` (two hosts in network namespaces) and `placement_cost.py` (the placement cost model).
No script imports another script.
"""
