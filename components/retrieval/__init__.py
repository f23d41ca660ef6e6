"""The generative retriever: query encoders, seq2seq backbones, training, constrained decoding, fusion."""
