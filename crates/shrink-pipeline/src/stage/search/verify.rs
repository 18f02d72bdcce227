//! The search's verifier: each allocation quantized for real (block by block when the search
//! reads its model so), read back and scored by rank 0, the measurement shared with every rank.

use super::*;

/// Verifies the search's allocations as a pipeline stage does.
pub(super) struct StageVerifier<'a> {
    /// The verified quantizations' input, calibration and ranks.
    pub(super) job: JobInput<'a>,
    pub(super) input: SearchInput<'a>,
    pub(super) request: &'a SearchRequest,
    /// Rank 0's.
    pub(super) scorer: Option<Scorer>,
    pub(super) out: &'a Path,
    pub(super) outcomes: BTreeMap<usize, QuantizeOutcome>,
}

impl StageVerifier<'_> {
    pub(super) fn candidate(&self, round: usize) -> PathBuf {
        self.out.with_extension(format!("round{round}.gguf"))
    }

    /// The file at `path` read back and scored: its size, its score and the output errors its
    /// quantization measured.
    fn score(
        &self,
        scorer: &Scorer,
        path: &Path,
        outcome: &QuantizeOutcome,
    ) -> shrink_search::Result<Measurement> {
        let failed =
            |e: String| shrink_search::SearchError::Input(format!("{}: {e}", path.display()));
        let written = shrink_io::load(path).map_err(|e| failed(e.to_string()))?;
        let score = match self.input {
            SearchInput::Whole(_) => {
                let mut back =
                    crate::build_model(&written, DType::F32).map_err(|e| failed(e.to_string()))?;
                scorer.score(&mut back)
            }
            SearchInput::BlockByBlock => {
                let mut back = written
                    .streamed(DType::F32)
                    .map_err(|e| failed(e.to_string()))?;
                scorer.score(&mut back)
            }
        }
        .map_err(|e| failed(e.to_string()))?;
        let size_bytes = std::fs::metadata(path)
            .map_err(|e| failed(e.to_string()))?
            .len();
        let errors = outcome
            .layers
            .iter()
            .filter_map(|l| l.relative_output_error.map(|e| (l.name.clone(), e)))
            .collect();
        Ok(Measurement {
            size_bytes,
            score,
            errors,
        })
    }
}

impl Verifier for StageVerifier<'_> {
    fn measure(
        &mut self,
        round: usize,
        items: &[Item],
        choices: &[usize],
    ) -> shrink_search::Result<Measurement> {
        let wrap = |e: PipelineError| shrink_search::SearchError::Input(e.to_string());
        let root = self.job.world.rank() == 0;
        // The previous round's file, unless it was kept.
        if round > 0 && root {
            let _ = std::fs::remove_file(self.candidate(round - 1));
        }
        let mut linears = Vec::new();
        let mut embeddings = self.request.embeddings.clone();
        for (item, &c) in items.iter().zip(choices) {
            let format = item.choices[c].name.clone();
            if item.name == EMBEDDINGS {
                embeddings = format;
            } else {
                for linear in item.name.split('+') {
                    linears.push((linear.to_string(), format.clone()));
                }
            }
        }
        let resolved = self
            .request
            .quantize(&linears, &embeddings)
            .resolve()
            .map_err(wrap)?;
        let path = self.candidate(round);
        let outcome = match self.input {
            SearchInput::Whole(m) => resolved.write(&self.job, &mut m.clone(), &path),
            SearchInput::BlockByBlock => resolved.write_streamed(&self.job, &path),
        }
        .map_err(wrap)?;
        // Rank 0 reads the model back as written (what llama.cpp will run), scores it and
        // shares the measurement.
        let measured = match &self.scorer {
            Some(scorer) if root => Some(self.score(scorer, &path, &outcome)?),
            _ => None,
        };
        let measurement = shrink_core::share_json(self.job.world, 0, measured.as_ref())?;
        self.outcomes.insert(round, outcome);
        Ok(measurement)
    }

    /// Rank 0's clock decides for every rank.
    fn out_of_time(&mut self, past_deadline: bool) -> shrink_search::Result<bool> {
        Ok(shrink_core::share_json(
            self.job.world,
            0,
            Some(&past_deadline),
        )?)
    }

    fn keep(&mut self, round: usize) -> shrink_search::Result<()> {
        if self.job.world.rank() != 0 {
            return Ok(());
        }
        let from = self.candidate(round);
        std::fs::rename(&from, self.out).map_err(|e| {
            shrink_search::SearchError::Input(format!(
                "moving {} to {}: {e}",
                from.display(),
                self.out.display()
            ))
        })
    }
}
