"""The ddpmseg command line (installed as ``ddpmseg.cli``): one thin click command per verb."""
