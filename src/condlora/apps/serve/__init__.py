"""`condlora serve`: a local web page (gradio, the `demo` extra) to try both halves.

synthesis     the Synthesis tab's work: a digits demo folder, LoRAs written from embeddings
conditioning  the Conditioning tab's work: trained runs, class grids, class weights
uploads       visitors' images and drawings checked and turned into digits
plots         the embedding scatter and the TimeLoRA heat map (matplotlib)
synthesis_page, conditioning_page   the two tabs (gradio), on shared widgets
server        `condlora serve`: the temporary folder, the gradio settings, the page built
              from the two tabs, launch and shutdown
"""
