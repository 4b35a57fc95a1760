"""`kvblend analyze`: figures and a markdown report from the result files under results/.

cli.py is imported whenever the kvblend parser is built, so it imports nothing heavy; report.py reads the
results (inputs.py), computes each section's numbers (tables.py) and draws them (plots.py, matplotlib Agg).
"""
