//! Terminal progress bars for the library's [`shrink_core::Progress`] callbacks; indicatif hides
//! them when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;

pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    pub fn new() -> Self {
        Self {
            bar: Mutex::new(None),
        }
    }
}

impl Bar {
    /// Runs `f` (which prints) with the current bar hidden, so lines do not tear it.
    pub fn suspend(&self, f: impl FnOnce()) {
        match self.bar.lock().ok().and_then(|slot| slot.clone()) {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }
}

impl shrink_core::Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(phase.to_string());
        if let Ok(mut slot) = self.bar.lock() {
            *slot = Some(bar);
        }
    }

    fn advance(&self, n: u64, message: Option<&str>) {
        if let Ok(slot) = self.bar.lock() {
            if let Some(bar) = slot.as_ref() {
                if let Some(m) = message {
                    bar.set_message(m.to_string());
                }
                bar.inc(n);
            }
        }
    }

    fn finish(&self) {
        if let Ok(mut slot) = self.bar.lock() {
            if let Some(bar) = slot.take() {
                bar.finish_and_clear();
            }
        }
    }
}
