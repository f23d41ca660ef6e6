"""Early stopping and best-epoch selection through Lightning's callbacks (components/retrieval/best_epoch.py)."""
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from components.retrieval.best_epoch import Loaders, fit_best_epoch


class Scripted(L.LightningModule):
    """Its weight is the epoch number (lr 0: training never moves it); validation reports a scripted recall."""

    def __init__(self, scores: list[float]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.scores = scores

    def training_step(self, batch, batch_idx):
        return self.w * batch[0].sum()

    def on_train_epoch_start(self):
        with torch.no_grad():
            self.w.fill_(self.current_epoch)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val_recall@10", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(scores, patience, max_epochs=10):
    module = Scripted(scores)
    dl = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)
    kwargs = dict(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False)
    return module, fit_best_epoch(module, kwargs, Loaders(dl, dl), "val_recall@10", patience)


def test_early_stopping_restores_the_best_epoch():
    module, fit = _fit([0.1, 0.3, 0.2, 0.25, 0.2, 0.9, 0.9], patience=2)
    assert fit.best_epoch == 1 and abs(fit.best_score - 0.3) < 1e-6
    assert fit.epochs_run == 4 and fit.stopped_early      # epochs 2 and 3 did not beat 0.3
    assert float(module.w.detach()) == 1.0                 # epoch 1's weights, not the last epoch's


def test_without_patience_every_epoch_runs_and_the_best_is_kept():
    module, fit = _fit([0.1, 0.3, 0.2, 0.25, 0.2, 0.9, 0.9], patience=0, max_epochs=7)
    assert fit.epochs_run == 7 and not fit.stopped_early
    assert fit.best_epoch == 5                             # ties keep the earlier epoch
    assert float(module.w.detach()) == 5.0


