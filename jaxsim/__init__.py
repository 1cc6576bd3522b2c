"""gymnax environments: the learned ClusterEnv and the reference queueing environment."""

from research import runtime

runtime.configure()
