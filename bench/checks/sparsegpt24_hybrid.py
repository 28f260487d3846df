"""HEAD engine with the f1988e3^ SparseGPT prune() swapped in: SmolLM2 2:4, solvers_table calibration and PPL."""
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from bench.sparsegpt_commits import old_solver
import layerprune.solvers.sparsegpt as S
Old = old_solver("f1988e3^")
S.SparseGPT.prune = Old.prune
from bench.solvers_table import calibration, wikitext_ppl
from bench.common import MODEL
from layerprune import load_model, prune
model, tok = load_model(MODEL)
rec = prune(model, tok, method="sparsegpt", sparsity=0.5, nm=(2, 4), calibration=calibration(tok), progress=False)
print("hybrid (old solver, HEAD engine) ppl", wikitext_ppl(model, tok), flush=True)
