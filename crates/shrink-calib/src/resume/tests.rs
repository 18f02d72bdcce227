use super::*;
use candle_core::{Device, Tensor};
use shrink_core::Collective;

/// The state's blocks, the engine's block and the activations a rank resumed with.
type Resumed = (usize, usize, Vec<f32>);

/// Two ranks (threads) record blocks 1 and 2, each its own activations; run again, both
/// resume at block 2 with rank 0's state and their own activations. Rank 1 keeps the
/// activations rank 0's previous state names; a rank missing them makes both start over.
#[test]
fn ranks_resume_together_from_their_own_activations() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| CalibError::Resume(e.to_string()))?;
    let out = dir.path().join("model.gguf");
    let xs = |rank: usize, block: usize| -> Result<Activations> {
        let v = (0..6).map(|i| (i + 10 * block + 100 * rank) as f32);
        let t = Tensor::from_iter(v, &Device::Cpu)?.reshape((2, 3))?;
        Ok(Activations::in_memory(vec![t]))
    };
    let run = |record: bool| -> Vec<Result<Option<Resumed>>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = shrink_core::ThreadGroup::new(2)
                .into_iter()
                .map(|world| {
                    let (out, xs) = (&out, &xs);
                    s.spawn(move || -> Result<Option<Resumed>> {
                        let job = BlockJob::open(out, "a job\n", true, &world)?;
                        if record {
                            for blocks in 1..=2 {
                                let state = (world.rank() == 0).then(|| {
                                    let bytes = 16 * blocks as u64;
                                    std::fs::write(job.partial(), vec![0u8; bytes as usize]).map(
                                        |()| Recorded {
                                            blocks,
                                            tensors: blocks,
                                            bytes,
                                            report: (),
                                        },
                                    )
                                });
                                let state = state
                                    .transpose()
                                    .map_err(|e| CalibError::Resume(e.to_string()))?;
                                let xs = xs(world.rank(), blocks)?;
                                job.record(&world, blocks, state.as_ref(), Some(&xs))?;
                            }
                            return Ok(None);
                        }
                        let Some((state, resume)) = job.resumed::<()>(Keep::default(), &world)?
                        else {
                            return Ok(None);
                        };
                        let got = resume.activations.get(0)?.flatten_all()?.to_vec1()?;
                        Ok(Some((state.blocks, resume.block, got)))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    for r in run(true) {
        assert!(r?.is_none());
    }
    let rank1 = dir.path().join(".shrink-resume-model.gguf.rank1");
    let rank0 = dir.path().join(".shrink-resume-model.gguf");
    assert!(rank1.join("activations-1.f32").exists());
    assert!(rank1.join("activations-2.f32").exists());
    assert!(!rank0.join("activations-1.f32").exists());
    assert!(!rank1.join(STATE).exists(), "rank 0 alone keeps the state");
    for (rank, r) in run(false).into_iter().enumerate() {
        let (blocks, block, got) = r?.expect("resumed");
        assert_eq!((blocks, block), (2, 2));
        let want: Vec<f32> = (0..6).map(|i| (i + 20 + 100 * rank) as f32).collect();
        assert_eq!(got, want, "rank {rank} resumes from its own activations");
    }
    std::fs::remove_file(rank1.join("activations-2.f32"))
        .map_err(|e| CalibError::Resume(e.to_string()))?;
    for r in run(false) {
        assert!(
            r?.is_none(),
            "a rank without its activations: every rank starts over"
        );
    }
    Ok(())
}

/// A run's first record is due; the next only once `RECORD_INTERVAL` has passed; a block with
/// no state (not due) records nothing and leaves the clock alone.
#[test]
fn records_are_due_first_then_once_per_interval() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| CalibError::Resume(e.to_string()))?;
    let world = shrink_core::Alone;
    let job = BlockJob::open(&dir.path().join("m.gguf"), "a job", false, &world)?;
    assert!(job.due());
    job.record::<()>(&world, 1, None, None)?;
    assert!(job.due(), "nothing recorded");
    std::fs::write(job.partial(), [0u8; 8]).map_err(|e| CalibError::Resume(e.to_string()))?;
    let state = Recorded {
        blocks: 1,
        tensors: 1,
        bytes: 8,
        report: (),
    };
    job.record(&world, 1, Some(&state), None)?;
    assert!(!job.due());
    job.last
        .set(Some(std::time::Instant::now() - RECORD_INTERVAL));
    assert!(job.due());
    Ok(())
}
