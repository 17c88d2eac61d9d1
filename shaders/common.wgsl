// common.wgsl: helpers shared by the kernel files. Not a kernel file of its own: src/gpu/shaders.rs
// appends it to every shader file when the file is compiled into the library (after the file's
// own text, so the line numbers of errors in a file stay that file's). It relies on the `const WG`
// (the workgroup size, a power of two) that every shader file defines.

// The flat index of a workgroup in a dispatch whose groups are split over x and y (x at most
// 65535; src/gpu/mod.rs `groups_2d`).
fn flat_group(wid: vec3<u32>) -> u32 {
    return wid.x + wid.y * 65535u;
}

var<workgroup> sum_scratch: array<f32, WG>;

// The sum of `v` over the WG invocations of the workgroup, returned to every invocation: a tree
// (stride WG/2, WG/4, ..., 1), so the order of the additions, and the result, are fixed. Every
// invocation of the workgroup must call it (uniform control flow).
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    sum_scratch[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            sum_scratch[lid] = sum_scratch[lid] + sum_scratch[lid + stride];
        }
        workgroupBarrier();
    }
    let total = sum_scratch[0];
    workgroupBarrier();
    return total;
}
