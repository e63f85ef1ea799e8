"""`fastsd batch`: the Azure ML batch endpoint's format (a folder of CSV files with a `prompt` column in,
one PNG per row and `predictions.csv` out), resumable, through the local engine or a deployment."""
