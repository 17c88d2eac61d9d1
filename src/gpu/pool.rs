//! The buffer pool: device buffers are recycled by size class instead of being created and
//! destroyed for every intermediate tensor. A class is the request rounded up to 4 steps per
//! power of two (at most 25% slack), so a training step reuses the same buffers step after step.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Figures of the pool, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolStats {
    /// Bytes of all device buffers the pool created and still holds (idle or in use).
    pub allocated: u64,
    /// Bytes of buffers held by live tensors.
    pub in_use: u64,
    /// Highest `in_use` so far.
    pub peak_in_use: u64,
    /// Buffers created (pool misses).
    pub created: u64,
    /// Requests served by a recycled buffer (pool hits).
    pub reused: u64,
}

#[derive(Default)]
pub(crate) struct BufferPool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    stats: PoolStats,
}

/// A device buffer on loan from the pool; returns there when dropped.
pub(crate) struct PooledBuffer {
    pub(crate) buffer: Option<wgpu::Buffer>,
    pub(crate) class: u64,
    pool: Rc<RefCell<BufferPool>>,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            let mut pool = self.pool.borrow_mut();
            pool.stats.in_use -= self.class;
            pool.free.entry(self.class).or_default().push(b);
        }
    }
}

fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(16);
    if b <= 256 {
        return b.div_ceil(16) * 16;
    }
    let step = (1u64 << (63 - b.leading_zeros())) / 4;
    b.div_ceil(step) * step
}

impl BufferPool {
    pub(crate) fn get(pool: &Rc<RefCell<BufferPool>>, device: &wgpu::Device, bytes: u64) -> PooledBuffer {
        let class = size_class(bytes);
        let mut p = pool.borrow_mut();
        let buffer = match p.free.get_mut(&class).and_then(|v| v.pop()) {
            Some(b) => {
                p.stats.reused += 1;
                b
            }
            None => {
                p.stats.created += 1;
                p.stats.allocated += class;
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: class,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            }
        };
        p.stats.in_use += class;
        p.stats.peak_in_use = p.stats.peak_in_use.max(p.stats.in_use);
        PooledBuffer { buffer: Some(buffer), class, pool: pool.clone() }
    }

    /// Whether a request of `bytes` can be served within `budget` bytes of allocated memory:
    /// by a recycled buffer, or by a new one that keeps the total within the budget.
    pub(crate) fn can_serve(&self, bytes: u64, budget: u64) -> bool {
        let class = size_class(bytes);
        self.free.get(&class).is_some_and(|v| !v.is_empty()) || self.stats.allocated.saturating_add(class) <= budget
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.stats
    }

    pub(crate) fn trim(&mut self) {
        for (class, v) in self.free.drain() {
            self.stats.allocated -= class * v.len() as u64;
            for b in v {
                b.destroy();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;
    #[test]
    fn size_classes_bound_the_slack() {
        for b in [1u64, 15, 16, 17, 255, 256, 257, 1000, 4096, 4097, 1 << 20, (1 << 20) + 1, 123_456_789] {
            let c = size_class(b);
            assert!(c >= b && c % 16 == 0, "{b} -> {c}");
            assert!(b < 256 || (c as f64) <= b as f64 * 1.25 + 16.0, "{b} -> {c}");
        }
    }
}
