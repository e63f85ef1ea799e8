"""`fastsd ui`: a web page (Gradio) that is one more client of a running deployment."""
