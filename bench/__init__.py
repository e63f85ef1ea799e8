"""`fastsd bench`: latency of each fastsd configuration side by side with the diffusers baseline."""
