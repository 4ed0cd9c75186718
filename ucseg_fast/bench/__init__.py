"""Measuring the engine: the step ledger (ops, bytes, FLOPs and a roofline estimate without a
GPU), honest kernel timing, and the one-command GPU report (`ucseg-fast bench ledger|report`)."""
