"""`condlora experiment`: a grid of configs x seeds, trained, scored and reported.

spec     the experiment file: variants, seeds, evaluation settings -> run configs
runner   trains and evaluates each run (reusing finished ones), the learning curve
report   report.md with the table, the curves and the diagnostics figures
"""
