//! The ranks of a run started by `mpirun` (with the `mpi` feature), or one process alone.

use anyhow::{bail, Result};
use shrink_core::Collective;

/// The number of processes the launcher started, from the environment OpenMPI (and PMI-based
/// launchers such as MPICH's) give each process; 1 without a launcher.
fn launched_ranks() -> usize {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1)
}

/// The ranks this process belongs to. Started by `mpirun -n N` (N > 1) without the `mpi`
/// feature, it refuses: N copies would each run the whole job and race for its output.
pub(crate) fn start() -> Result<World> {
    let ranks = launched_ranks();
    #[cfg(feature = "mpi")]
    if ranks > 1 {
        return mpi_world::start().map(World::Mpi);
    }
    if ranks > 1 {
        bail!(
            "started as one of {ranks} MPI processes, but this shrink was built without MPI: \
             build it with `cargo build --release --features mpi` (needs openmpi-bin and \
             libopenmpi-dev), or run it without mpirun"
        );
    }
    Ok(World::Alone(shrink_core::Alone))
}

pub(crate) enum World {
    Alone(shrink_core::Alone),
    #[cfg(feature = "mpi")]
    Mpi(mpi_world::Mpi),
}

impl World {
    pub(crate) fn collective(&self) -> &dyn Collective {
        match self {
            World::Alone(a) => a,
            #[cfg(feature = "mpi")]
            World::Mpi(m) => m,
        }
    }

    /// The lone process's collective (`None` under MPI).
    pub(crate) fn alone(&self) -> Option<&shrink_core::Alone> {
        match self {
            World::Alone(a) => Some(a),
            #[cfg(feature = "mpi")]
            World::Mpi(_) => None,
        }
    }

    /// Ends every rank after this one failed: the others would wait for it forever.
    pub(crate) fn abort(&self) {
        #[cfg(feature = "mpi")]
        if let World::Mpi(m) = self {
            m.abort();
        }
    }
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use anyhow::{Context, Result};
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::Root;

    /// MPI's world: MPI is finalized when it is dropped.
    pub(crate) struct Mpi {
        world: SimpleCommunicator,
        local: usize,
        _universe: mpi::environment::Universe,
    }

    pub(crate) fn start() -> Result<Mpi> {
        let universe = mpi::initialize().context("initializing MPI")?;
        // A rank that panics ends them all: unwinding would finalize MPI, which waits for the
        // other ranks, themselves waiting for this one in a broadcast.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            SimpleCommunicator::world().abort(101)
        }));
        let world = universe.world();
        let local = world.split_shared(world.rank()).size() as usize;
        Ok(Mpi {
            world,
            local,
            _universe: universe,
        })
    }

    impl Mpi {
        pub(crate) fn abort(&self) {
            self.world.abort(1)
        }
    }

    impl shrink_core::Collective for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn broadcast(&self, root: usize, data: &mut [u8]) {
            // MPI counts are 32-bit: a 28,672-wide Hessian (3.3 GB) goes in pieces of 1 GiB.
            let root = self.world.process_at_rank(root as i32);
            for piece in data.chunks_mut(1 << 30) {
                root.broadcast_into(piece);
            }
        }
        fn ranks_on_this_machine(&self) -> usize {
            self.local
        }
    }
}
