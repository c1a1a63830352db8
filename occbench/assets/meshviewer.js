// occbench's self-contained mesh viewer: WebGL 1, no libraries, works from a file:// URL.
// Each <canvas class="occmesh" data-mesh="ID"> shows the mesh stored in the JSON script tag #ID:
// {"positions": base64 float32 (V*3), "colors": base64 uint8 (V*4), "indices": base64 uint32 (F*3)}.
// Drag to rotate, wheel to zoom.
(function () {
  function decode(b64, Type) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Type(bytes.buffer);
  }
  function shader(gl, type, src) {
    var s = gl.createShader(type); gl.shaderSource(s, src); gl.compileShader(s);
    if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s));
    return s;
  }
  function normals(pos, idx) {
    var n = new Float32Array(pos.length);
    for (var f = 0; f < idx.length; f += 3) {
      var a = idx[f] * 3, b = idx[f + 1] * 3, c = idx[f + 2] * 3;
      var ux = pos[b] - pos[a], uy = pos[b + 1] - pos[a + 1], uz = pos[b + 2] - pos[a + 2];
      var vx = pos[c] - pos[a], vy = pos[c + 1] - pos[a + 1], vz = pos[c + 2] - pos[a + 2];
      var nx = uy * vz - uz * vy, ny = uz * vx - ux * vz, nz = ux * vy - uy * vx;
      [a, b, c].forEach(function (k) { n[k] += nx; n[k + 1] += ny; n[k + 2] += nz; });
    }
    return n;
  }
  function mat(yaw, pitch, zoom, aspect) {
    var cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
    // rotation = Rx(pitch) * Ry(yaw), then scale and a simple orthographic projection
    var r = [cy, sp * sy, -cp * sy, 0, 0, cp, sp, 0, sy, -sp * cy, cp * cy, 0, 0, 0, 0, 1];
    var s = zoom;
    return [r[0] * s / aspect, r[1] * s, r[2] * s * 0.5, 0, r[4] * s / aspect, r[5] * s, r[6] * s * 0.5, 0,
            r[8] * s / aspect, r[9] * s, r[10] * s * 0.5, 0, 0, 0, 0, 1];
  }
  function setup(canvas) {
    var data = JSON.parse(document.getElementById(canvas.dataset.mesh).textContent);
    var pos = decode(data.positions, Float32Array), col = decode(data.colors, Uint8Array);
    var idx = decode(data.indices, Uint32Array);
    var gl = canvas.getContext("webgl");
    if (!gl) { canvas.replaceWith(document.createTextNode("(WebGL unavailable: see the renders)")); return; }
    gl.getExtension("OES_element_index_uint");
    var prog = gl.createProgram();
    gl.attachShader(prog, shader(gl, gl.VERTEX_SHADER,
      "attribute vec3 p; attribute vec3 n; attribute vec4 c; uniform mat4 m; varying vec4 vc; varying float l;" +
      "void main(){ vec4 q = m * vec4(p, 1.0); gl_Position = vec4(q.xy, q.z, 1.0);" +
      " vec3 nn = normalize((m * vec4(n, 0.0)).xyz); l = 0.45 + 0.55 * abs(nn.z); vc = c; }"));
    gl.attachShader(prog, shader(gl, gl.FRAGMENT_SHADER,
      "precision mediump float; varying vec4 vc; varying float l; void main(){ gl_FragColor = vec4(vc.rgb * l, 1.0); }"));
    gl.linkProgram(prog); gl.useProgram(prog);
    // centre and scale the mesh to [-1, 1]
    var lo = [1e9, 1e9, 1e9], hi = [-1e9, -1e9, -1e9];
    for (var i = 0; i < pos.length; i++) { lo[i % 3] = Math.min(lo[i % 3], pos[i]); hi[i % 3] = Math.max(hi[i % 3], pos[i]); }
    var ext = Math.max(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]) / 2, p2 = new Float32Array(pos.length);
    for (i = 0; i < pos.length; i++) p2[i] = (pos[i] - (lo[i % 3] + hi[i % 3]) / 2) / ext;
    function attr(name, arr, size, type, norm) {
      var b = gl.createBuffer(); gl.bindBuffer(gl.ARRAY_BUFFER, b); gl.bufferData(gl.ARRAY_BUFFER, arr, gl.STATIC_DRAW);
      var loc = gl.getAttribLocation(prog, name); gl.enableVertexAttribArray(loc);
      gl.vertexAttribPointer(loc, size, type, norm, 0, 0);
    }
    attr("p", p2, 3, gl.FLOAT, false); attr("n", normals(p2, idx), 3, gl.FLOAT, false);
    attr("c", col, 4, gl.UNSIGNED_BYTE, true);
    var ib = gl.createBuffer(); gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, ib); gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, idx, gl.STATIC_DRAW);
    var yaw = 0, pitch = 0, zoom = 0.9, drag = null;
    function draw() {
      gl.viewport(0, 0, canvas.width, canvas.height); gl.clearColor(1, 1, 1, 1);
      gl.enable(gl.DEPTH_TEST); gl.depthFunc(gl.GREATER); gl.clearDepth(-1);
      gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
      gl.uniformMatrix4fv(gl.getUniformLocation(prog, "m"), false, new Float32Array(mat(yaw, pitch, zoom, canvas.width / canvas.height)));
      gl.drawElements(gl.TRIANGLES, idx.length, gl.UNSIGNED_INT, 0);
    }
    canvas.addEventListener("mousedown", function (e) { drag = [e.clientX, e.clientY]; });
    window.addEventListener("mouseup", function () { drag = null; });
    window.addEventListener("mousemove", function (e) {
      if (!drag) return; yaw += (e.clientX - drag[0]) * 0.01; pitch += (e.clientY - drag[1]) * 0.01;
      drag = [e.clientX, e.clientY]; draw();
    });
    canvas.addEventListener("wheel", function (e) { e.preventDefault(); zoom *= e.deltaY < 0 ? 1.1 : 0.9; draw(); });
    draw();
    canvas.dataset.ready = "1";
  }
  window.addEventListener("load", function () {
    document.querySelectorAll("canvas.occmesh").forEach(setup);
  });
})();
