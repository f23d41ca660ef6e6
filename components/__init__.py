"""sa2crq components: data, tokenizers, retriever, metrics. Flows and stages call these."""
