"""The applications built on the library: each uses the library's public names only (their
reports share condlora.core.reporting).

quickstart       `condlora quickstart`: baseline vs UC-LoRA on the embedded digits, a report
experiment       `condlora experiment`: a grid of configs x seeds, trained, scored, reported
synthesis_demo   `condlora synth demo`: a zoo of handwriting-style LoRAs and the synthesis methods
serve            `condlora serve`: a local web page to try both halves
cli              the commands of quickstart, experiment and synth demo
"""
