"""Analysis tools (``mone-analyze``): the sparsification study and neuron-activation plots.

One file, one job:

- ``cli``: the command line (argparse, one-line errors, exit code 2 for bad input);
- ``models``: which kind of model a path holds; ``our_models`` / ``hf_models``: loading our
  checkpoints or local Hugging Face MoE models and hooking their routed experts;
- ``neurons``: what the hooks do to each expert's neurons (keep the top K by |act(gate)|, record);
- ``data``: held-out token windows streamed from indexed datasets or text files;
- ``sparsify`` / ``activations``: the two studies, their tables, JSON and PNG figures;
- ``outputs``: result files written atomically, never overwritten by accident.

See docs/analysis.md.
"""
