// Draw every chart of the page: each <div class="chart" data-figure="..."> holds a plotly figure's JSON.
// A chart may link its points: data-click="<url template with {x} and {y}>" opens that page on a click.
document.querySelectorAll("div.chart[data-figure]").forEach(function (div) {
  var figure = JSON.parse(div.dataset.figure);
  var config = Object.assign({responsive: true, displaylogo: false}, figure.config || {});
  Plotly.newPlot(div, figure.data, figure.layout || {}, config).then(function () {
    div.dataset.drawn = "1";
    if (div.dataset.click) {
      div.on("plotly_click", function (event) {
        var p = event.points[0];
        var cd = p.customdata === undefined ? "" : p.customdata;
        window.location = div.dataset.click.replace("{x}", encodeURIComponent(p.x))
          .replace("{y}", encodeURIComponent(p.y)).replace("{customdata}", encodeURIComponent(cd));
      });
    }
  });
});
