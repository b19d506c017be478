"""Where a run's service actors live: on the driver's node.

The key budgets and the response cache are actors that hold a run's state and cannot be
restarted without losing it (what was sent, which rows are parked on which leader). On a
cluster, any worker node may go (a spot instance); the driver's node is the one node whose
loss ends the job anyway. So these actors are pinned there, and losing a worker costs only
what Ray Data restarts and retries by itself.
"""

from __future__ import annotations

from typing import Any


def on_driver_node() -> Any:
    """A scheduling strategy for the node this driver runs on.

    Hard affinity on purpose: that node lives as long as the driver, and these actors ask for
    no CPU, so they always fit; Ray 2.60 ignored a *soft* affinity for a zero-CPU actor and
    spread it over the cluster.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
