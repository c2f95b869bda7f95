// The animated avatar viewer: decodes the quantised per-frame Gaussians that headavatar/web_viewer.py embeds in
// the page and plays them with gsplat.js (WebGL2), beside the ground-truth video. Bundled by esbuild into
// viewer.bundle.js (npm run build), which the page inlines: nothing is fetched at run time.
import * as SPLAT from "gsplat";

function embedded(id) {
  const text = document.getElementById(id).textContent.trim();
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

const meta = JSON.parse(document.getElementById("avatar-meta").textContent);
const blob = embedded("avatar-frames");
const n = meta.count;
const frameBytes = 17 * n; // per Gaussian: position 3 x u16, rotation 4 x i8, log-scale 3 x u8, RGBA 4 x u8

// Writes frame f into the splat's arrays (positions, rotations w-x-y-z, scales, colours) in place.
function decode(f, data) {
  const base = f * frameBytes;
  const pos = new Uint16Array(blob.buffer.slice(base, base + 6 * n));
  const rot = new Int8Array(blob.buffer, base + 6 * n, 4 * n);
  const scl = new Uint8Array(blob.buffer, base + 10 * n, 3 * n);
  const rgba = new Uint8Array(blob.buffer, base + 13 * n, 4 * n);
  const [lo, hi] = [meta.position_min, meta.position_max];
  const [smin, smax] = [meta.log_scale_min, meta.log_scale_max];
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < 3; k++) {
      data.positions[3 * i + k] = lo[k] + (pos[3 * i + k] / 65535) * (hi[k] - lo[k]);
      data.scales[3 * i + k] = Math.exp(smin + (scl[3 * i + k] / 255) * (smax - smin));
    }
    const q = [rot[4 * i], rot[4 * i + 1], rot[4 * i + 2], rot[4 * i + 3]];
    const norm = Math.hypot(...q) || 1;
    for (let k = 0; k < 4; k++) data.rotations[4 * i + k] = q[k] / norm;
  }
  data.colors.set(rgba);
}

const data = new SPLAT.SplatData(n, new Float32Array(3 * n), new Float32Array(4 * n), new Float32Array(3 * n),
                                 new Uint8Array(4 * n));
decode(0, data);
const splat = new SPLAT.Splat(data);
const scene = new SPLAT.Scene();
scene.addObject(splat);
const canvas = document.getElementById("avatar");
const camera = new SPLAT.Camera();
if (meta.focal) { // the ground truth camera's focal length, as a fraction of the image width
  camera.data.fx = camera.data.fy = meta.focal * canvas.width;
}
const renderer = new SPLAT.WebGLRenderer(canvas);
renderer.backgroundColor = new SPLAT.Color32(0, 0, 0, 255);
const controls = new SPLAT.OrbitControls(camera, canvas, 0, 0, meta.camera_distance, false);
controls.minZoom = meta.camera_distance / 4;
controls.maxZoom = meta.camera_distance * 4;

const video = document.getElementById("truth");
const button = document.getElementById("play");
const label = document.getElementById("frame");
const state = { frame: 0, playing: true, shown: -1, rendered: 0 };

function show(f) {
  state.frame = f;
  label.textContent = `frame ${f + 1} / ${meta.frames}`;
  if (video && video.readyState >= 1) video.currentTime = (f + 0.5) / meta.fps;
}

function setPlaying(playing) {
  state.playing = playing;
  button.textContent = playing ? "Pause" : "Play";
}

button.addEventListener("click", () => setPlaying(!state.playing));
let last = 0;
function tick(t) {
  // The next frame only once this one is decoded and handed to the renderer: a slow machine plays slower
  // instead of skipping frames.
  if (state.playing && state.shown === state.frame && t - last >= 1000 / meta.fps) {
    show((state.frame + 1) % meta.frames);
    last = t;
  }
  if (state.shown !== state.frame && !splat.data.detached) { // the data worker holds the arrays while it packs
    decode(state.frame, splat.data);
    splat.data.changed = true;
    splat.raiseChangeEvent(); // the renderer re-packs an object's data only when the object says it changed
    state.shown = state.frame;
  }
  controls.update();
  renderer.render(scene, camera);
  state.rendered += 1;
  requestAnimationFrame(tick);
}
show(0);
requestAnimationFrame(tick);
// For people at the console and for the browser test: the state, and a way to stop on one frame.
window.avatarViewer = { state, meta, setPlaying, show };
