"""Stage 3, caption synthesis: a shared runner (`runner.run_captioning`) and one module per backend
(gpt, llava, llama, retrieval); cleaning, de-duplication and the per-image cache are shared."""
