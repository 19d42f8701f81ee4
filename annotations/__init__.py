"""The paper's label sets (index,name,r,g,b CSV files), installed as ``ddpmseg.annotations``."""
