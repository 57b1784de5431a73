"""eplb service: the control plane for expert-parallel load balancing.

The planner side (placement model, balance metrics, migration, policies) works on numpy alone;
torch tensors are accepted where torch is installed but torch is never imported at module load.
"""

__version__ = "0.1.0"
