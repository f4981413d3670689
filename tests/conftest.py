import os

# Triton kernels run on CPU through the interpreter; Triton reads this when it is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
