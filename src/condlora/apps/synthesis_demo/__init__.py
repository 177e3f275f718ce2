"""The embedded demo of zero-shot LoRA synthesis (`condlora synth demo`), on the digits.

styles    a subject = a handwriting style (stroke width, slant, rotation, scale)
zoo       one LoRA per subject, fine-tuned in batches of subjects (the library's bank and
          loop, condlora.synthesis.zoo), written as peft folders
encoder   the subject encoder (stand-in for ArcFace): image sets -> unit vectors
methods   LoRA writers from an embedding: a plug-in interface, simple baselines, slots
scoring   digits drawn with many subjects' LoRAs at once; subject score, class accuracy,
          LoRA MSE, time; mean +- std over seeds
stages    the cached stages (base model, judge, encoder, embeddings, collections)
report    report.md, grids, the curve against the number of training subjects
run       the whole demo, each stage reused when done
"""
